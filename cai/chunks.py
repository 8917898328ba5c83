"""The one resumable loop of the data stages: work in fixed chunks, commit each whole.

A data stage splits its work into chunks in a fixed order (critique: prompts sorted
by length, `batch_size` at a time; evaluate: each model's prompts, then each pair of
models). A chunk's rows are appended to the stage's JSONL files; only then is the
chunk committed to a ledger (`.<loop>.chunks.jsonl`), one line holding the chunk's key
and the size of every output file after it. On a rerun the files are cut back to the
sizes of the last committed chunk: rows of a chunk that did not finish (a kill
mid-write, a torn last line, a server that stopped answering) are dropped and the
chunk is redone. So a rerun ends with files identical to an uninterrupted run's, with
nothing lost and nothing doubled, whatever the engine and wherever the kill came.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Sequence

from tqdm.auto import tqdm

from cai.rundir import append_jsonl, read_jsonl


class ChunkLedger:
    """The output files of one resumable loop, and which of its chunks are committed."""

    def __init__(self, folder: Path, loop: str, files: Sequence[str]):
        self.paths = {name: Path(folder) / name for name in files}
        self.ledger = Path(folder) / f".{loop}.chunks.jsonl"
        entries = read_jsonl(self.ledger, repair=True)
        self.committed = {entry["chunk"] for entry in entries}
        sizes = entries[-1]["sizes"] if entries else {}
        self.cut_bytes = 0
        for name, path in self.paths.items():
            keep, size = sizes.get(name, 0), path.stat().st_size if path.exists() else 0
            if size < keep:
                raise RuntimeError(f"{path} is shorter ({size} bytes) than its committed chunks ({keep} bytes): "
                                   f"it was changed outside cai; move the stage folder aside (--force) to redo it")
            if size > keep:  # rows of a chunk that did not commit
                with open(path, "r+b") as f:
                    f.truncate(keep)
                self.cut_bytes += size - keep

    def done(self, key: str) -> bool:
        return key in self.committed

    def commit(self, key: str, rows: dict[str, list[dict]]) -> None:
        """Append a chunk's rows to its files, then record the chunk as committed."""
        for name, file_rows in rows.items():
            append_jsonl(self.paths[name], file_rows)
        sizes = {name: path.stat().st_size if path.exists() else 0 for name, path in self.paths.items()}
        append_jsonl(self.ledger, [{"chunk": key, "sizes": sizes}])
        self.committed.add(key)

    def rows(self, name: str) -> list[dict]:
        return read_jsonl(self.paths[name])


def chunked_by_length(prompts, size: int, prefix: str = "") -> list[tuple[str, list]]:
    """Fixed chunks of `size` prompts, texts of similar length together (little
    padding), keyed by `prefix` and their first prompt's id: the same chunks on every
    run, whatever the engine."""
    ordered = sorted(prompts, key=lambda p: (len(p.text), p.id))
    return [(prefix + ordered[i].id, ordered[i:i + size]) for i in range(0, len(ordered), size)]


def run_chunks(ledger: ChunkLedger, chunks: Iterable[tuple[str, object]], work: Callable[[int, object], dict],
               desc: str, total: int | None = None, size: Callable[[object], int] = len) -> int:
    """Run `work(index, chunk) -> {file: rows}` for every chunk not yet committed, in
    order, committing each. Returns how many chunks ran in this call."""
    chunks = list(chunks)
    initial = sum(size(chunk) for key, chunk in chunks if ledger.done(key))
    if ledger.cut_bytes:
        print(f"[cai] {desc}: dropped {ledger.cut_bytes} bytes of an unfinished chunk; redoing it")
        ledger.cut_bytes = 0
    bar = tqdm(total=total if total is not None else sum(size(c) for _, c in chunks), initial=initial, desc=desc)
    ran = 0
    try:
        for index, (key, chunk) in enumerate(chunks):
            if ledger.done(key):
                continue
            ledger.commit(key, work(index, chunk))
            ran += 1
            bar.update(size(chunk))
    finally:
        bar.close()
    return ran
