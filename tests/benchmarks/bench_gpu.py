"""GPU benchmark: interp's costs on a Llama-3-8B-shaped pair against the bare computations they wrap, in one run.

    python tests/benchmarks/bench_gpu.py            # on a CUDA machine: about 3 minutes on one H200
    python tests/benchmarks/bench_gpu.py --tiny     # the same measurements on a small config (CPU too): a smoke run

The pair is built on the device with random weights in bfloat16, no hub: a LlamaConfig with Llama-3-8B's sizes
(32 layers, d_model 4096, 32 heads, 8 KV heads, MLP 14336, vocab 128256), the tuned model a copy with a rank-16
change to every matrix of its first `--changed-layers` layers. Each row times ours and its baseline alternately,
`--repeats` times, keeps the fastest of each and prints their ratio (target for capture: <= 1.05):

    capture, last token      interp.capture of every resid_post at the last token / the plain HF forward
    capture, every token     the same at every token (all of it copied to the CPU in float32) / the plain forward
    TransformerLens cache    the bridge's run_with_cache of every hook_resid_post (kept on the GPU) / plain forward
    nnsight save             every layer's output .save()d inside an nnsight trace / plain forward
    TuCo                     analyses.tuco.measure / one tuned plus one base forward
    intruders                analyses.intruders.measure / bare svd(W0), svd(Wt), svdvals(W_t - W_0) of the same matrices
    LID                      analyses.lid.estimate (pointwise TwoNN, k=128) on 60,000 x 4096 points / its k-NN
                             matrix products (addmm + topk in the same chunks)

and the peak GPU memory of ours (the pair's weights included) as a markdown table. Without CUDA (and without
--tiny) it says so and exits with status 0.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from collections.abc import Callable

import torch

EIGHT_B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
               rms_norm_eps=1e-5, tie_word_embeddings=False)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, max_position_embeddings=256, tie_word_embeddings=False)


def build_pair(sizes: dict, device: torch.device, changed_layers: int, folder: str, seed: int = 0):
    """Base and tuned `interp.Model`s built directly on `device` in bfloat16 (random weights); a word-level tokenizer
    saved in `folder` (TransformerBridge reloads its tokenizer from where it was saved)."""
    from tokenizers import Tokenizer, models
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from interp.models import Model, Pair

    cfg = LlamaConfig(**sizes, attn_implementation="eager", pad_token_id=0, bos_token_id=1, eos_token_id=1)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            base = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(default)
    tuned = copy.deepcopy(base)
    g = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for layer in tuned.model.layers[:changed_layers]:
            for linear in (m for m in layer.modules() if isinstance(m, torch.nn.Linear)):
                out, inp = linear.weight.shape
                a = torch.randn(out, 16, device=device, generator=g, dtype=torch.bfloat16)
                b = torch.randn(16, inp, device=device, generator=g, dtype=torch.bfloat16)
                linear.weight.add_(0.02 * linear.weight.std() * (a @ b) / 4)
    vocab = {f"t{i}": i for i in range(256)}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), pad_token="t0",
                            bos_token="t1", eos_token="t1").save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return Pair(Model(base, tokenizer, "llama-8b-shape base"), Model(tuned, tokenizer, "llama-8b-shape tuned"))


def synced(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def race(ours: Callable, baseline: Callable, repeats: int, device: torch.device,
         warm: bool = True) -> tuple[float, float, float]:
    """(fastest ours s, fastest baseline s, peak GPU bytes during ours), run alternately (after a warm-up of each)."""
    sync, times, peak = synced(device), {"ours": [], "baseline": []}, 0
    if warm:
        ours(), baseline()
    for _ in range(repeats):
        for name, fn in (("ours", ours), ("baseline", baseline)):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
            if name == "ours" and device.type == "cuda":
                peak = max(peak, torch.cuda.max_memory_allocated(device))
    return min(times["ours"]), min(times["baseline"]), peak


def knn_matmuls(x: torch.Tensor, k: int, chunk: int) -> None:
    """The bare k-NN core: centred rows, ||b||^2 - 2ab by chunked addmm, topk (what `analyses.lid.knn` does)."""
    centred = x - x.mean(0)
    sq = centred.square().sum(1)
    for start in range(0, len(x), chunk):
        torch.addmm(sq, centred[start: start + chunk], centred.T, alpha=-2).topk(k, dim=1, largest=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a small config (runs on the CPU when there is no GPU)")
    parser.add_argument("--batch", type=int, help="prompts per forward (default 8; tiny 4)")
    parser.add_argument("--seq", type=int, help="tokens per prompt (default 512; tiny 16)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--changed-layers", type=int, default=1, help="layers the tuned model changes (intruders)")
    parser.add_argument("--lid-points", type=int, help="points of the LID cloud (default 60000; tiny 3000)")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.tiny:
        print("bench_gpu: no CUDA device on this machine; run it on a GPU (or pass --tiny for a CPU smoke run)",
              file=sys.stderr)
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch, seq = args.batch or (4 if args.tiny else 8), args.seq or (16 if args.tiny else 512)
    n_points = args.lid_points or (3000 if args.tiny else 60000)

    import interp
    from analyses import intruders, lid, tuco
    from analyses.intruders.matrices import changed_matrices, layout, model_params
    from analyses.intruders.spectra import svd, svdvals
    from analyses.lid.knn import MEMORY_BUDGET
    from interp.prompts import Tokens
    from interp.sites import every_layer

    start = time.perf_counter()
    folder = tempfile.TemporaryDirectory()
    pair = build_pair(TINY if args.tiny else EIGHT_B, device, args.changed_layers, folder.name)
    base, tuned = pair.models
    built = time.perf_counter() - start
    resident = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    ids = torch.randint(2, tuned.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
    tokens = Tokens(ids, torch.full((batch,), seq), 0)
    mask = torch.ones_like(ids)
    posts = every_layer("resid_post", tuned.n_layers)

    def forward(model):
        with torch.no_grad():
            model.hf(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)

    def bridge_cache():
        with torch.no_grad():
            tuned.bridge.run_with_cache(ids.to(device), names_filter=lambda name: name.endswith("hook_resid_post"))

    def nnsight_save():
        with torch.no_grad(), tuned.nnsight.trace(input_ids=ids.to(device), attention_mask=mask.to(device)):
            [tuned.nnsight.model.layers[i].output.save() for i in range(tuned.n_layers)]

    transposed, extra = layout(base, False)
    matrices = list(changed_matrices(model_params(base), model_params(tuned), transposed, extra, device))

    def bare_svds():
        for _, W0, Wt in matrices:
            svd(W0), svd(Wt), svdvals(Wt.float() - W0.float())

    cloud = torch.randn(n_points, tuned.d_model, device=device, generator=torch.Generator(device).manual_seed(2))
    k = 128 if n_points > 1000 else 16
    chunk = max(1, MEMORY_BUDGET // (cloud.element_size() * (2 * n_points + k)))
    svd(torch.eye(8, device=device))  # the solver's start-up, outside the one timed intruders run
    rows = [  # label, baseline, ours, baseline, repeats (None: --repeats, after a warm-up)
        ("capture, every resid_post at the last token", "plain forward",
         lambda: interp.capture(tuned, tokens, posts, positions="last", batch_size=batch, progress=False),
         lambda: forward(tuned), None),
        ("capture, every resid_post at every token (to the CPU, float32)", "plain forward",
         lambda: interp.capture(tuned, tokens, posts, batch_size=batch, progress=False), lambda: forward(tuned),
         None),
        ("TransformerLens bridge run_with_cache, every hook_resid_post", "plain forward", bridge_cache,
         lambda: forward(tuned), None),
        ("nnsight trace, every layer's output .save()", "plain forward", nnsight_save, lambda: forward(tuned), None),
        ("TuCo (tuco.measure)", "tuned + base forward",
         lambda: tuco.measure(pair, tokens, batch_size=batch, progress=False), lambda: (forward(tuned), forward(base)),
         None),
        (f"intruders.measure ({len(matrices)} changed matrices, float32; 1 run)", "bare svd, svd, svdvals",
         lambda: intruders.measure(pair, device=device, progress=False), bare_svds, 1),
        (f"LID, pointwise TwoNN k={k}, {n_points} x {tuned.d_model}", "its k-NN matmuls",
         lambda: lid.estimate(cloud, k), lambda: knn_matmuls(cloud, k, chunk), None),
    ]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\n{'tiny' if args.tiny else 'Llama-3-8B'}-shaped random pair in bfloat16 on {name}: batch {batch} x {seq} "
          f"tokens; built in {built:.0f} s, weights {resident / 2**30:.1f} GiB; fastest of {args.repeats}\n")
    print("| measured | baseline | ours (ms) | baseline (ms) | ratio | peak GPU memory (GiB) |")
    print("|---|---|---:|---:|---:|---:|")
    for label, against, ours, baseline, repeats in rows:
        t_ours, t_base, peak = race(ours, baseline, repeats or args.repeats, device, warm=repeats is None)
        print(f"| {label} | {against} | {t_ours * 1e3:.1f} | {t_base * 1e3:.1f} | {t_ours / t_base:.3f} | "
              f"{peak / 2**30:.1f} |", flush=True)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
