"""Records allocation traces from real CPU training loops into benches/traces/ (format of
DESIGN.md: op,id,bytes,stream), the way ../shared/traces/cnn_train.csv was made: torch.profiler's
memory events over a few training steps after one warm-up step.

    PYTHONPATH=python python benches/record_cpu_traces.py [NAME ...]   (default: all)

Models: a transformer encoder with variable sequence lengths, an LSTM language model and an MLP
with variable batch sizes; a small convolutional net whose batch size ramps up step by step
(convnet_ramp: 16, 32, 64, 128), and a causal decoder with gradient accumulation over
micro-batches of varying length (decoder_accum). Held out (recorded after the pool's policy was
last tuned, to check it on families it was not tuned on): a small U-Net (encoder-decoder with skip
connections) whose batch size shrinks step by step (unet_shrink: 48, 32, 24, 16, as a job backing
off after memory pressure), and a recommender with embedding bags of random length and a random
batch size per step, trained with Adagrad (embbag_mlp); and, recorded after the placement rule
was chosen on the eight others, a graph convolution net over a batch of random graphs whose total
node count changes every step (gcn_graphs). Allocations made before recording and still
live have no row.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

OUT = Path(__file__).resolve().parent / "traces"


def transformer_step() -> Callable[[int], None]:
    layer = torch.nn.TransformerEncoderLayer(d_model=256, nhead=8, dim_feedforward=1024, batch_first=True)
    net = torch.nn.TransformerEncoder(layer, num_layers=3, enable_nested_tensor=False)
    opt = torch.optim.AdamW(net.parameters())

    def step(i: int) -> None:
        x = torch.randn(16, (48, 96, 64, 128)[i % 4], 256)  # variable sequence length
        loss = net(x).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def lstm_step() -> Callable[[int], None]:
    emb = torch.nn.Embedding(5000, 256)
    lstm = torch.nn.LSTM(256, 512, num_layers=2, batch_first=True)
    head = torch.nn.Linear(512, 5000)
    params = [*emb.parameters(), *lstm.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params)

    def step(i: int) -> None:
        tokens = torch.randint(0, 5000, (8, (32, 48, 40)[i % 3] + 1))
        out, _ = lstm(emb(tokens[:, :-1]))
        loss = torch.nn.functional.cross_entropy(head(out).flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def mlp_step() -> Callable[[int], None]:
    net = torch.nn.Sequential(
        torch.nn.Linear(784, 2048),
        torch.nn.GELU(),
        torch.nn.Linear(2048, 2048),
        torch.nn.GELU(),
        torch.nn.Linear(2048, 10),
    )
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

    def step(i: int) -> None:
        x = torch.randn((64, 256, 128)[i % 3], 784)  # variable batch size
        y = torch.randint(0, 10, (x.shape[0],))
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def convnet_ramp_step() -> Callable[[int], None]:
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1),
        torch.nn.BatchNorm2d(32),
        torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3, padding=1, stride=2),
        torch.nn.BatchNorm2d(64),
        torch.nn.ReLU(),
        torch.nn.Conv2d(64, 128, 3, padding=1, stride=2),
        torch.nn.BatchNorm2d(128),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(128, 10),
    )
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True)

    def step(i: int) -> None:
        bsz = 16 << min(i, 3)  # a batch-size schedule: 16, 32, 64, 128, 128, ...
        x = torch.randn(bsz, 3, 32, 32)
        y = torch.randint(0, 10, (bsz,))
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def decoder_accum_step() -> Callable[[int], None]:
    vocab, d = 4000, 192
    layer = torch.nn.TransformerDecoderLayer(d_model=d, nhead=6, dim_feedforward=768, batch_first=True)
    body = torch.nn.TransformerDecoder(layer, num_layers=2)
    emb = torch.nn.Embedding(vocab, d)
    head = torch.nn.Linear(d, vocab)
    params = [*emb.parameters(), *body.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=3e-4)

    def step(i: int) -> None:
        opt.zero_grad(set_to_none=True)
        for micro in range(3):  # gradient accumulation over micro-batches of varying length
            n = (40, 72, 56)[(i + micro) % 3]
            tokens = torch.randint(0, vocab, (6, n + 1))
            x = emb(tokens[:, :-1])
            mask = torch.nn.Transformer.generate_square_subsequent_mask(n)
            out = body(x, x, tgt_mask=mask, tgt_is_causal=True)
            loss = torch.nn.functional.cross_entropy(head(out).flatten(0, 1), tokens[:, 1:].flatten()) / 3
            loss.backward()
        opt.step()

    return step


class _UNet(torch.nn.Module):
    """Two levels down, two up, the encoder's activations concatenated into the decoder."""

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> torch.nn.Module:
            return torch.nn.Sequential(
                torch.nn.Conv2d(cin, cout, 3, padding=1), torch.nn.GroupNorm(8, cout), torch.nn.SiLU()
            )

        self.down1, self.down2, self.mid = block(3, 32), block(32, 64), block(64, 128)
        self.up2, self.dec2 = torch.nn.ConvTranspose2d(128, 64, 2, stride=2), block(128, 64)
        self.up1, self.dec1 = torch.nn.ConvTranspose2d(64, 32, 2, stride=2), block(64, 32)
        self.out = torch.nn.Conv2d(32, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d1 = self.down1(x)
        d2 = self.down2(torch.nn.functional.max_pool2d(d1, 2))
        m = self.mid(torch.nn.functional.max_pool2d(d2, 2))
        u2 = self.dec2(torch.cat([self.up2(m), d2], dim=1))
        u1 = self.dec1(torch.cat([self.up1(u2), d1], dim=1))
        return self.out(u1)


def unet_shrink_step() -> Callable[[int], None]:
    net = _UNet()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)

    def step(i: int) -> None:
        bsz = (48, 32, 24, 16)[min(max(i - 1, 0), 3)]  # recorded steps 1-4 shrink: 48, 32, 24, 16
        x = torch.randn(bsz, 3, 32, 32)
        loss = torch.nn.functional.mse_loss(net(x), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def embbag_mlp_step() -> Callable[[int], None]:
    tables = torch.nn.ModuleList(torch.nn.EmbeddingBag(n, 64, mode="sum") for n in (20000, 5000, 800))
    top = torch.nn.Sequential(
        torch.nn.Linear(3 * 64 + 13, 512),
        torch.nn.ReLU(),
        torch.nn.Linear(512, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 1),
    )
    opt = torch.optim.Adagrad([*tables.parameters(), *top.parameters()], lr=0.01)
    gen = torch.Generator().manual_seed(1)

    def step(i: int) -> None:
        bsz = int(torch.randint(256, 2048, (1,), generator=gen))  # a random batch size per step
        pooled = []
        for t in tables:
            lengths = torch.randint(1, 40, (bsz,), generator=gen)  # bags of random length
            idx = torch.randint(0, t.num_embeddings, (int(lengths.sum()),), generator=gen)
            offsets = torch.cumsum(lengths, 0) - lengths
            pooled.append(t(idx, offsets))
        dense = torch.randn(bsz, 13, generator=gen)
        logit = top(torch.cat([*pooled, dense], dim=1)).squeeze(1)
        y = torch.randint(0, 2, (bsz,), generator=gen).float()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def gcn_graphs_step() -> Callable[[int], None]:
    w = [torch.nn.Linear(64, 256), torch.nn.Linear(256, 256), torch.nn.Linear(256, 8)]
    opt = torch.optim.Adam([p for lin in w for p in lin.parameters()], lr=1e-3)
    gen = torch.Generator().manual_seed(2)

    def step(i: int) -> None:
        n = (3000, 7000, 5000, 9000)[i % 4]  # nodes in this step's batch of graphs
        edges = torch.randint(0, n, (2, 8 * n), generator=gen)
        adj = torch.sparse_coo_tensor(edges, torch.full((8 * n,), 1 / 8), (n, n)).coalesce()
        h = torch.randn(n, 64, generator=gen)
        for lin in w[:-1]:
            h = torch.relu(torch.sparse.mm(adj, lin(h)))
        loss = torch.nn.functional.cross_entropy(w[-1](h), torch.randint(0, 8, (n,), generator=gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


MODELS: dict[str, Callable[[], Callable[[int], None]]] = {
    "transformer_train": transformer_step,
    "lstm_train": lstm_step,
    "mlp_train": mlp_step,
    "convnet_ramp": convnet_ramp_step,
    "decoder_accum": decoder_accum_step,
    "unet_shrink": unet_shrink_step,
    "embbag_mlp": embbag_mlp_step,
    "gcn_graphs": gcn_graphs_step,
}


def record(step: Callable[[int], None], steps: int = 3) -> list[tuple[str, int, int, int]]:
    step(0)  # warm-up: optimizer state, caches
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for i in range(1, steps + 1):
            step(i)
    events: list[tuple[int, int, int]] = []

    def walk(node) -> None:  # type: ignore[no-untyped-def]
        if node.typed[0] == _EventType.Allocation:
            f = node.typed[1]
            events.append((node.start_time_ns, f.ptr, f.alloc_size))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    events.sort()
    rows: list[tuple[str, int, int, int]] = []
    live: dict[int, tuple[int, int]] = {}
    next_id = 0
    for _, ptr, size in events:
        if size > 0:
            live[ptr] = (next_id, size)
            rows.append(("alloc", next_id, size, 0))
            next_id += 1
        elif size < 0 and ptr in live:
            ident, nbytes = live.pop(ptr)
            rows.append(("free", ident, nbytes, 0))
    return rows


def main() -> None:
    names = sys.argv[1:] or list(MODELS)
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        raise SystemExit(f"record_cpu_traces.py: unknown model(s) {unknown}; expected some of {sorted(MODELS)}")
    torch.set_num_threads(2)
    OUT.mkdir(exist_ok=True)
    for name in names:
        torch.manual_seed(0)
        steps = 4 if name in ("convnet_ramp", "unet_shrink") else 3  # the schedules' four batch sizes
        rows = record(MODELS[name](), steps)
        path = OUT / f"{name}.csv"
        with open(path, "w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["op", "id", "bytes", "stream"])
            w.writerows(rows)
        print(f"{path}: {len(rows)} rows")


if __name__ == "__main__":
    main()
