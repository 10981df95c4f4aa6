"""The gradient-scale rule: every step is the seed's ``lr * grad(L) / W_seed`` (+ weight decay) whether the
stage runs as one process or as 2 DDP ranks (gloo, spawned here), checked against the seed's update
computed by hand on a tiny network."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from isc.train.config import TrainConfig

W_SEED = 4  # the seed's process count the lr is stated for (v83's 4 GPUs)
ITEMS, NCROPS = 8, 2  # global batch: 8 items x 2 views
# freeze_bn: BatchNorm uses its running statistics, so each image's embedding does not depend on which
# process holds the rest of the batch (SyncBatchNorm, which gives the same on GPU, does not run on CPU).
CFG = TrainConfig(backbone="test_efficientnet", pretrained=False, input_size=32, dim=32, batch_size=ITEMS,
                  ncrops=NCROPS, memory_size=64, lr=0.1, wd=0.05, momentum=0.9, lr_world_size=W_SEED,
                  freeze_bn=True, device="cpu", amp="false")


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch in the loop's layout: each item's views next to each other, labelled by item."""
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(ITEMS * NCROPS, 3, 32, 32, generator=gen)
    labels = torch.arange(ITEMS).repeat_interleave(NCROPS)
    return images, labels


def _initial_state() -> dict[str, torch.Tensor]:
    from isc.models import create_model

    torch.manual_seed(0)
    net = create_model(CFG.backbone, pretrained=False, gem_p=CFG.gem_p, gem_eval_p=CFG.gem_eval_p, dim=CFG.dim,
                       input_size=CFG.input_size)
    return {k: v.clone() for k, v in net.state_dict().items()}


def _project_step(cfg: TrainConfig, rank: int, world: int) -> tuple[dict[str, torch.Tensor], float]:
    """One step of the training loop's own parts (model, loss, optimizer, loss scale) on this rank's slice."""
    from isc.models.head import keep_frozen_in_eval
    from isc.train import distributed as ddp
    from isc.train import parts as loop_parts

    info = ddp.setup("cpu")
    assert info.world_size == world and info.rank == rank
    parts = loop_parts.setup(cfg, info, weights_given=True, init_path=None)
    parts.net.load_state_dict(_initial_state())
    parts.model.train()
    keep_frozen_in_eval(parts.net, cfg.freeze_blocks, all_bn=cfg.freeze_bn)
    images, labels = _batch()
    per_rank = len(images) // world
    local = slice(rank * per_rank, (rank + 1) * per_rank)
    loss = parts.criterion(parts.model(images[local]), labels[local])
    loop_parts.optimizer_step(parts, loss)
    return {k: v.detach().clone() for k, v in parts.net.named_parameters() if v.requires_grad}, parts.loss_scale


def _rank_worker(rank: int, world: int, store: str, out: str) -> None:
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    # a FileStore rendezvous: no socket is opened by the test
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        params, scale = _project_step(CFG, rank, world)
        torch.save({"params": params, "loss_scale": scale}, Path(out) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def _seed_update() -> tuple[dict[str, torch.Tensor], ...]:
    """By hand: W_SEED processes as the seed ran them (pml 0.9.99's DistributedLossWrapper: the global batch
    gathered in rank order with only the local slice differentiable, the loss not scaled;
    DDP's average of the W_SEED gradients), then SGD's first step ``p - lr * (g + wd * p)`` with the
    project's weight-decay groups. Returns (expected params, the seed's averaged gradient, grad(L), the
    weight-decay part lr * wd * p of the update)."""
    from pytorch_metric_learning.losses import ContrastiveLoss, CrossBatchMemory

    from isc.models import create_model
    from isc.models.head import freeze_batch_norms, keep_frozen_in_eval
    from isc.train.parts import param_groups

    net = create_model(CFG.backbone, pretrained=False, gem_p=CFG.gem_p, gem_eval_p=CFG.gem_eval_p, dim=CFG.dim,
                       input_size=CFG.input_size)
    net.load_state_dict(_initial_state())
    freeze_batch_norms(net)
    net.train()
    keep_frozen_in_eval(net, 0, all_bn=True)
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    params = [p for p in net.parameters() if p.requires_grad]
    images, labels = _batch()

    def xbm_loss(emb: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
        return CrossBatchMemory(ContrastiveLoss(pos_margin=CFG.pos_margin, neg_margin=CFG.neg_margin),
                                embedding_size=CFG.dim, memory_size=CFG.memory_size)(emb, lab)

    emb = net(images)
    full = torch.autograd.grad(xbm_loss(emb, labels), params, retain_graph=True)
    slices = list(torch.arange(len(images)).chunk(W_SEED))
    per_rank = []
    for k in range(W_SEED):
        # pml 0.9.99's all_gather: every rank's slice in rank order, the local one put back with its gradient
        gathered = torch.cat([emb[s] if j == k else emb[s].detach() for j, s in enumerate(slices)])
        per_rank.append(torch.autograd.grad(xbm_loss(gathered, labels), params, retain_graph=True))
    seed_grad = [torch.stack(gs).mean(0) for gs in zip(*per_rank, strict=True)]
    wd_of = {id(p): group["weight_decay"] for group in param_groups(net, CFG.wd) for p in group["params"]}
    expected = {n: (p - CFG.lr * (g + wd_of[id(p)] * p)).detach() for n, p, g in zip(names, params, seed_grad, strict=True)}
    decay = {n: (CFG.lr * wd_of[id(p)] * p).detach() for n, p in zip(names, params, strict=True)}
    return expected, dict(zip(names, seed_grad, strict=True)), dict(zip(names, full, strict=True)), decay


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.timeout(300)
def test_one_process_and_two_gloo_ranks_step_as_the_seed_on_its_w_seed_gpus(tmp_path, monkeypatch):
    expected, seed_grad, full_grad, decay = _seed_update()
    # the seed's averaged gradient is grad(L) / W_SEED (the rule's premise), not grad(L)
    assert _max_diff(seed_grad, {k: g / W_SEED for k, g in full_grad.items()}) < 1e-7
    assert max(float(g.abs().max()) for g in full_grad.values()) > 1e-3  # a gradient worth checking
    # the check can fail: without the rule (lr * grad(L)) or with weight decay dropped, the update is off
    unscaled = {k: expected[k] - CFG.lr * (full_grad[k] - seed_grad[k]) for k in expected}  # p - lr (grad(L) + wd p)
    assert _max_diff(expected, unscaled) > 1e-4
    assert max(float(d.abs().max()) for d in decay.values()) > 1e-4

    # one process: the whole global batch, loss scaled by 1 / W_SEED
    monkeypatch.setenv("WORLD_SIZE", "1")
    one, scale_one = _project_step(CFG, 0, 1)
    assert scale_one == pytest.approx(1 / W_SEED)
    d1 = _max_diff(one, expected)

    # two gloo ranks: half the batch each, loss scaled by 2 / W_SEED, DDP averaging
    out = tmp_path / "ranks"
    out.mkdir()
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["loss_scale"] for r in ranks] == [pytest.approx(2 / W_SEED)] * 2
    d2 = [_max_diff(r["params"], expected) for r in ranks]
    print(f"max |param - seed's| after one step: 1 process {d1:.3g}, 2 gloo ranks {d2[0]:.3g} / {d2[1]:.3g}; "
          f"without the rule it would be {_max_diff(expected, unscaled):.3g}")
    assert d1 < 1e-6 and max(d2) < 1e-6
