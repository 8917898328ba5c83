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

Under several processes (`cai.distributed`) the pending chunks are dealt out in rounds:
in each round process k works on the round's k-th chunk, the main process gathers the
rows and commits them in chunk order. A chunk's rows depend only on the chunk and its
index (its seeds), never on which process made them, so N processes write exactly the
files one process writes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from cai import console, distributed
from cai.rundir import append_jsonl, read_jsonl


class ChunkLedger:
    """The output files of one resumable loop, and which of its chunks are committed.
    Only the main process reads and repairs the files; the others learn the committed
    chunks from it (`run_chunks`)."""

    def __init__(self, folder: Path, loop: str, files: Sequence[str]):
        self.paths = {name: Path(folder) / name for name in files}
        self.ledger = Path(folder) / f".{loop}.chunks.jsonl"
        self.committed: set[str] = set()
        self.cut_bytes = 0
        if distributed.is_main():
            self._repair()

    def _repair(self) -> None:
        entries = read_jsonl(self.ledger, repair=True)
        self.committed = {entry["chunk"] for entry in entries}
        sizes = entries[-1]["sizes"] if entries else {}
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
        """Append a chunk's rows to its files, then record the chunk as committed. A write
        that fails (a full disk) cuts every file back to where it was: the files stay as the
        last committed chunk left them, and the error goes on."""
        before = {path: path.stat().st_size for path in [*self.paths.values(), self.ledger] if path.exists()}
        try:
            for name, file_rows in rows.items():
                append_jsonl(self.paths[name], file_rows)
            sizes = {name: path.stat().st_size if path.exists() else 0 for name, path in self.paths.items()}
            append_jsonl(self.ledger, [{"chunk": key, "sizes": sizes}])
        except BaseException:
            if distributed.is_main():
                for path in [*self.paths.values(), self.ledger]:
                    if path.exists() and path.stat().st_size > before.get(path, 0):
                        with open(path, "r+b") as f:  # cutting back needs no space
                            f.truncate(before.get(path, 0))
            raise
        self.committed.add(key)

    def rows(self, name: str) -> list[dict]:
        return read_jsonl(self.paths[name])


def chunked_by_length(prompts, size: int, prefix: str = "") -> list[tuple[str, list]]:
    """Fixed chunks of `size` prompts, texts of similar length together (little
    padding), keyed by `prefix` and their first prompt's id: the same chunks on every
    run, whatever the engine."""
    ordered = sorted(prompts, key=lambda p: (len(p.text), p.id))
    return [(prefix + ordered[i].id, ordered[i:i + size]) for i in range(0, len(ordered), size)]


def chunk_seed(seed: int, index: int, salt: int = 0) -> int:
    """The sampling seed of a chunk loop's `index`-th chunk (its place in the loop, the same
    on every run and resume): the one formula of every data stage. `salt` keeps a loop's
    seeds apart from another's on the same run seed (sft's helpful answers)."""
    return (seed + salt) * 100_003 + index * 101


class OnFirstChunk:
    """A model a chunk loop needs (an engine, a judge), opened when the first chunk still to
    do asks for it: a finished stage loads nothing, a resumed one only if work is left.
    Call it for the model; `value` is None while it has not been opened."""

    def __init__(self, open_model: Callable[[], object]):
        self._open = open_model
        self.value = None

    def __call__(self):
        if self.value is None:
            self.value = self._open()
        return self.value


def run_chunks(ledger: ChunkLedger, chunks: Iterable[tuple[str, object]], work: Callable[[int, object], dict],
               desc: str, total: int | None = None, size: Callable[[object], int] = len) -> int:
    """Run `work(index, chunk) -> {file: rows}` for every chunk not yet committed, in
    order, committing each (`index` is the chunk's place in `chunks`, the same on every
    run). Returns how many chunks ran. Under several processes every process calls this
    with the same chunks; they share the work and all return after the last commit."""
    chunks = list(chunks)
    ledger.committed = distributed.broadcast(ledger.committed)
    pending = [i for i, (key, _) in enumerate(chunks) if not ledger.done(key)]
    if ledger.cut_bytes:
        print(f"[cai] {desc}: dropped {ledger.cut_bytes} bytes of an unfinished chunk; redoing it")
        ledger.cut_bytes = 0
    waiting = set(pending)
    initial = sum(size(chunk) for i, (_, chunk) in enumerate(chunks) if i not in waiting)
    bar = console.bar(total=total if total is not None else sum(size(c) for _, c in chunks), initial=initial,
                      desc=desc, disable=not distributed.is_main())
    processes, me = distributed.world_size(), distributed.rank()
    try:
        for start in range(0, len(pending), processes):
            batch = pending[start:start + processes]
            mine = batch[me] if me < len(batch) else None
            rows = work(mine, chunks[mine][1]) if mine is not None else None
            gathered = distributed.gather(rows) if processes > 1 else [rows]
            for index, chunk_rows in zip(batch, gathered):
                ledger.commit(chunks[index][0], chunk_rows)
                bar.update(size(chunks[index][1]))
    finally:
        bar.close()
    distributed.barrier()  # the files are complete before anyone reads them
    return len(pending)
