"""The shared toy training loop: checkpoints where asked, prunes periodic ones, and resumes exactly."""

from __future__ import annotations

import pytest
import torch

from interplab.models.toy import ToyConfig, ToyTransformer
from interplab.toy.loop import StepOutcome, checkpoint_dir, saved_checkpoints, train_loop


class Interrupted(Exception):
    pass


def fresh() -> tuple[ToyTransformer, torch.optim.Optimizer]:
    model = ToyTransformer(ToyConfig(n_layers=1, d_model=8, n_heads=1, d_head=4, d_mlp=None, n_ctx=4, d_vocab=5,
                                     seed=0))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def run(out, interrupt_at: int | None = None, steps: int = 10):
    """Train 10 steps of next-token prediction on seeded random tokens; keep a checkpoint at step 5, periodic ones
    every 3 steps; the caller's state is the list of losses seen."""
    model, optimizer = fresh()
    losses: list[float] = []

    def batch_loss(step: int) -> torch.Tensor:
        tokens = torch.randint(0, 5, (8, 5), generator=torch.Generator().manual_seed(step))
        return torch.nn.functional.cross_entropy(model(tokens[:, :-1]).transpose(1, 2), tokens[:, 1:])

    def after_step(step: int, loss: float) -> StepOutcome:
        if step == interrupt_at:
            raise Interrupted
        losses.append(loss)
        return StepOutcome(checkpoint=step == 5)

    def restore(state: dict) -> None:
        losses[:] = state["losses"]

    result = train_loop(model, optimizer, out, steps=steps, learning_rate=lambda s: 1e-2 * (s + 1) / 10,
                        batch_loss=batch_loss, after_step=after_step, state=lambda: {"losses": list(losses)},
                        restore=restore, checkpoint_every=3, progress=False)
    return model, losses, result


def test_kept_checkpoints_stay_and_only_the_newest_periodic_one_is_kept(tmp_path):
    _, losses, result = run(tmp_path / "a")
    # periodic at 3, 6, 9 (each replacing the one before), kept at 5 and at the last step 10, which replaces 9
    assert result.checkpoints == [5, 10] == [s for s, _ in saved_checkpoints(tmp_path / "a")]
    assert (result.steps, result.resumed_from, len(losses)) == (10, 0, 10)
    assert {p.name for p in checkpoint_dir(tmp_path / "a", 5).iterdir()} >= {"model.safetensors", "optimizer.pt",
                                                                             "progress.json"}


def test_an_interrupted_run_resumes_exactly(tmp_path):
    model_a, losses_a, _ = run(tmp_path / "a")
    with pytest.raises(Interrupted):
        run(tmp_path / "b", interrupt_at=8)            # after the periodic checkpoint at step 6
    assert [s for s, _ in saved_checkpoints(tmp_path / "b")] == [5, 6]
    model_b, losses_b, result = run(tmp_path / "b")
    assert result.resumed_from == 6 and result.steps == 10 and result.checkpoints == [5, 10]
    assert losses_b == losses_a                         # the caller's state came back with the checkpoint
    a, b = model_a.state_dict(), model_b.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_already_stopped_trains_nothing_but_leaves_a_checkpoint(tmp_path):
    model, optimizer = fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_loop(model, optimizer, tmp_path, steps=10, learning_rate=lambda s: 1.0,
                        batch_loss=lambda s: pytest.fail("no step should run"),
                        after_step=lambda s, loss: StepOutcome(), state=dict, restore=lambda state: None,
                        begin=lambda step: True, progress=False)
    assert (result.steps, result.checkpoints) == (0, [0])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
