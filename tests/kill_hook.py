"""Test-only `sitecustomize` for the kill tests (tests/test_kills.py, test_rounds.py,
test_multiprocess_kills.py): the process waits at the point named by CAI_TEST_WAIT_AT, after
writing "POINT PID" to CAI_TEST_WAITING, until the test kills it. Under `accelerate launch`
only the process of rank CAI_TEST_WAIT_RANK waits (unset in one process: RANK is unset too).
cai knows nothing of it; the tests copy it onto the subprocess's path.

Points: `STAGE@STEP` (a training stage at the end of an optimizer step), `gather:N` (the
N-th cross-process gather), `[FOLDER/]LOOP:N` (a chunk loop after N committed chunks, the
next chunk's rows half written, the last one torn).
"""

import json
import os
import time


def _wait(what):
    path = os.environ["CAI_TEST_WAITING"]
    with open(path + ".tmp", "w") as f:  # renamed into place: the test never sees it half written
        f.write(f"{what} {os.getpid()}")
    os.replace(path + ".tmp", path)
    time.sleep(600)  # until the test's SIGKILL


_point = os.environ.get("CAI_TEST_WAIT_AT", "")
if _point and os.environ.get("RANK") == os.environ.get("CAI_TEST_WAIT_RANK"):
    if "@" in _point:
        _stage, _step = _point.split("@")
        from transformers.trainer_callback import CallbackHandler

        _on_step_end = CallbackHandler.on_step_end

        def on_step_end(self, args, state, control):
            control = _on_step_end(self, args, state, control)
            if f"/{_stage}/" in str(args.output_dir) and state.global_step == int(_step):
                _wait(_point)
            return control

        CallbackHandler.on_step_end = on_step_end
    elif _point.startswith("gather:"):
        import cai.distributed

        _gather, _calls = cai.distributed.gather, []

        def gather(value):
            _calls.append(1)
            if len(_calls) == int(_point.split(":")[1]):
                _wait(_point)
            return _gather(value)

        cai.distributed.gather = gather
    else:
        _loop, _committed = _point.split(":")
        _folder, _, _loop = _loop.rpartition("/")
        import cai.chunks

        _commit = cai.chunks.ChunkLedger.commit

        def commit(self, key, rows):
            if (self.ledger.name == f".{_loop}.chunks.jsonl" and len(self.committed) == int(_committed)
                    and (not _folder or f"/{_folder}/" in str(self.ledger))):
                name, file_rows = next((n, r) for n, r in rows.items() if r)
                text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in file_rows).encode()
                with open(self.paths[name], "ab") as f:  # half of the chunk's rows, the last one torn
                    f.write(text[: len(text) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                _wait(_point)
            return _commit(self, key, rows)

        cai.chunks.ChunkLedger.commit = commit
