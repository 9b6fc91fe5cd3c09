"""Under two gloo ranks the ITC loss and its gradients equal one process on the whole batch, and a
hard negative drawn across ranks is never a sample's own positive."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mllm.models.losses import ContrastiveHead, gathered_offset, mine_hard_negatives

B, Q, D = 3, 2, 8


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2 * B, Q, D, generator=g), torch.randn(2 * B, D, generator=g)


def _loss_and_grads(kind: str, image: torch.Tensor, text: torch.Tensor):
    image, text = image.clone().requires_grad_(True), text.clone().requires_grad_(True)
    loss, sim_i2t, sim_t2i = ContrastiveHead(kind)(F.normalize(image, dim=-1), F.normalize(text, dim=-1))
    loss.backward()
    return loss.detach(), image.grad, text.grad, sim_i2t.detach(), sim_t2i.detach()


def _worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        image, text = _data()
        mine = slice(rank * B, (rank + 1) * B)
        out = {}
        for kind in ("infonce", "sigmoid"):
            loss, g_img, g_txt, sim_i2t, sim_t2i = _loss_and_grads(kind, image[mine], text[mine])
            out[kind] = tuple(t.tolist() for t in (loss, g_img, g_txt))  # tensors do not cross a Queue
        positives = torch.arange(B) + gathered_offset(B)
        picks = torch.stack([mine_hard_negatives(sim_t2i, positives) for _ in range(50)])
        out["negatives_ok"] = bool((picks != positives).all()) and int(picks.max()) < 2 * B
        out["sim_shape"] = tuple(sim_i2t.shape)
        queue.put((rank, out))
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(rank, port, queue)) for rank in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    image, text = _data()
    for kind in ("infonce", "sigmoid"):
        loss, g_img, g_txt, _, _ = _loss_and_grads(kind, image, text)
        per_rank = [[torch.tensor(t) for t in results[r][kind]] for r in range(2)]
        # each rank's loss is over its own rows: their mean is the whole batch's loss
        assert torch.allclose((per_rank[0][0] + per_rank[1][0]) / 2, loss, atol=1e-5)
        # DDP averages the ranks' gradients: each sample's gradient, over 2, is the whole batch's
        assert torch.allclose(torch.cat([per_rank[0][1], per_rank[1][1]]) / 2, g_img, atol=1e-6)
        assert torch.allclose(torch.cat([per_rank[0][2], per_rank[1][2]]) / 2, g_txt, atol=1e-6)
    assert all(results[r]["negatives_ok"] for r in range(2))
    assert results[0]["sim_shape"] == (B, 2 * B)
