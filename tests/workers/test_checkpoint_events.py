"""A CHECKPOINT event without an epoch or metrics still makes a checkpoint: the model is posted
with a `checkpoint` (empty), so the server lists it in the task's results.checkpoints."""

from __future__ import annotations

from tests.support.procs import poll_for
from tests.workers.test_results_bounds import Ctx, RecordingAPI
from workers.checkpoints import CheckpointUploader


class CheckpointAPI(RecordingAPI):
    def __init__(self):
        super().__init__()
        self.checkpoints: list = []

    def post_results(self, task_id, kind, name, files, **extra):
        self.checkpoints.append(extra.get("checkpoint"))
        return super().post_results(task_id, kind, name, files, **extra)


def test_a_checkpoint_event_without_an_epoch_is_posted_as_a_checkpoint(tmp_path):
    ctx = Ctx(tmp_path / "agent", CheckpointAPI())
    ctx.task = {"id": 7, "type": "train"}
    for sub, body in (("ck1", b"one"), ("ck2", b"two")):
        (ctx.task_dir / "results" / sub).mkdir(parents=True)
        (ctx.task_dir / "results" / sub / "w.bin").write_bytes(body)
    live = CheckpointUploader(ctx).start()
    try:
        live.on_event({"message": "checkpoint", "event_type": "checkpoint", "subdir": "ck1"})
        live.on_event({"event_type": "checkpoint", "subdir": "ck2", "optional": {"epoch": 2, "loss": 0.5}})
        poll_for(lambda: len(ctx.api.checkpoints) == 2, timeout=30, what="two checkpoints posted")
    finally:
        live.stop()
    assert ctx.api.checkpoints == [{}, {"epoch": 2, "metrics": {"loss": 0.5}}]
