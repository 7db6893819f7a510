"""CPU encoding speed and accuracy: the reference llm2vec against lm2vec's default, each precision and other
inference engines, in one run on the same texts.

Texts: the first 1000 unique STS-B test sentences (``--texts stsb``) or SciFact abstracts truncated at 512 tokens
(``--texts scifact --count 200``); batch 32, 2 threads, mean pooling, bidirectional. The model: the built-in
SmolLM2 (untrained) or ``--model DIR`` (a trained encoder; the reference then loads the same weights). Every mode
runs in its own worker process (so peak RSS is per mode): the reference ``llm2vec==0.2.3`` in its own venv
(``make reference``, see ../shared/peers/official_llm2vec), lm2vec in this one. Modes:

- ``reference``; ``fp32`` (lm2vec float32: bit-identical in any batch); ``default`` (``lm2vec.load()``, i.e.
  ``dtype="auto"``: what this machine measures fastest and stays float32-grade); ``default-compiled`` (the
  default with each transformer block under ``torch.compile``, see :func:`compile_blocks`); ``fp32-fast``
  (float32 without batch invariance); ``bf16`` and ``int8`` (lower-precision linear layers where calibration
  allows);
- engines tried on the exported ONNX graph: ``ort-fp32`` (ONNX Runtime), ``ort-int8`` (ONNX Runtime
  ``MatMulNBits``: 8-bit symmetric weights in blocks of 32, ``accuracy_level=4``, i.e. int8 activations
  quantized per block), ``openvino-int8`` (NNCF int8 symmetric weights, the CPU plugin's dynamic activation
  quantization in groups of 32, f32 inference precision).

The modes that lower the model's precision load it once first, alone, each in a process of its own: calibration and
conversion, cached per machine and model, are printed apart (seconds, peak RSS), and the table's peak RSS is that of
a load from the cache and the encoding, as every later process sees it. All workers load and warm up on one batch
first, one at a time; then the timed runs alternate between modes so drift in the machine's speed hits all alike. In
the same run the parent measures the matmul peak of each precision (2048^3 products on the same threads, in torch
and in ONNX Runtime; the better counts), and each mode's model FLOP/s is given as a fraction of its precision's
peak. Model FLOPs: 2 x non-embedding parameters x real tokens (of a mixture of experts: the experts a token is
routed to), plus attention (4 x layers x hidden x length^2 per text). Accuracy: per-text cosine to lm2vec fp32.
The reference loads four architectures (Llama, Mistral, Gemma, Qwen2): leave ``reference`` out of ``--modes`` for
others (``benchmarks/moe_model.py`` writes a mixture-of-experts model to run).

    python benchmarks/vs_reference.py [--texts stsb|scifact] [--model DIR] [--repeats 3] [--modes ...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path

REPLY = "RESULT "  # worker stdout lines carrying results start with this; anything else is passed over
LM2VEC_MODES = {
    "fp32": "float32",
    "default": "auto",
    "default-compiled": "auto",
    "fp32-fast": "float32",
    "bf16": "bfloat16",
    "int8": "int8",
    "ort-fp32": "float32",
    "ort-int8": "float32",
    "openvino-int8": "float32",
}
NEEDS = {"ort": ("onnxruntime", "onnx"), "openvino": ("openvino", "nncf")}  # the optional extras per engine
LOWERING = ("auto", "bfloat16", "int8")  # the dtypes whose first load calibrates the model
PEAK_OF = {"bf16": "bf16", "int8": "int8", "ort-int8": "int8", "openvino-int8": "int8"}  # others: fp32
MODE_NAMES = ", ".join(["reference", *LM2VEC_MODES])
DEFAULT_MODES = "reference,fp32,default,default-compiled,fp32-fast,bf16,int8,ort-fp32,ort-int8,openvino-int8"
REFERENCE_DIR = Path(os.environ.get("LM2VEC_REFERENCE_DIR", Path(__file__).resolve().parents[1] / ".peer-llm2vec"))


def reply(obj: dict) -> None:
    print(REPLY + json.dumps(obj), flush=True)


def serve(encode, tokens: int, texts: list[str], args: argparse.Namespace, extra: dict) -> None:
    """The worker loop shared by both sides: warm up, report, then one timed pass per ``run`` line."""
    import numpy as np

    embeddings = encode(texts[: args.batch_size])
    reply({"tokens": tokens, **extra})
    for command in sys.stdin:
        if command.strip() != "run":
            break
        start = time.perf_counter()
        embeddings = encode(texts)
        reply({"seconds": time.perf_counter() - start})
    np.save(args.embeddings, np.asarray(embeddings, dtype=np.float32))
    reply({"peak_rss_mb": peak_rss_mb()})


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def reference_worker(args: argparse.Namespace, texts: list[str]) -> None:
    """Runs in the reference's venv: only torch and llm2vec are imported."""
    import torch
    from llm2vec import LLM2Vec

    torch.set_num_threads(args.threads)
    # doc_max_length: the reference otherwise cuts documents to 400 tokens (by whole words) before max_length
    model = LLM2Vec.from_pretrained(
        str(args.model or args.reference / "smollm2-hf"),
        enable_bidirectional=True,
        pooling_mode="mean",
        max_length=args.max_length,
        doc_max_length=args.max_length,
        **({"attn_implementation": args.attention} if args.attention else {}),
    )
    model.eval()
    tokens = sum(len(ids) for ids in model.tokenizer(texts, truncation=True, max_length=args.max_length)["input_ids"])

    def encode(batch: list[str]):
        return model.encode(batch, batch_size=args.batch_size, show_progress_bar=False).float().numpy()

    serve(encode, tokens, texts, args, {})


def lm2vec_worker(args: argparse.Namespace, texts: list[str]) -> None:
    import torch

    import lm2vec

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    dtype = LM2VEC_MODES[args.worker]
    encoder = lm2vec.load(args.model, dtype=dtype, max_length=args.max_length, attn_implementation=args.attention)
    if args.prepare:  # the one-time work of a first load (calibration, conversion), cached for later loads
        reply({"load_s": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb()})
        return
    if args.worker == "fp32-fast":
        encoder.batch_invariant = False
    chosen = encoder.dtype
    extra: dict = {}
    if args.worker == "default-compiled":
        start = time.perf_counter()
        compile_blocks(encoder)
        encoder.encode(texts, batch_size=args.batch_size, show_progress_bar=False)  # compiles every shape it meets
        extra["compile_s"] = time.perf_counter() - start
    if args.worker.startswith(("ort-", "openvino-")):
        encoder, chosen = engine_encoder(encoder, args.worker), args.worker
    lengths = [len(ids) for ids in encoder.tokenizer(texts, truncation=True, max_length=args.max_length)["input_ids"]]
    flops = model_flops(encoder.model, lengths)

    def encode(batch: list[str]):
        return encoder.encode(batch, batch_size=args.batch_size, show_progress_bar=False)

    extra |= {"flops": flops, "dtype": chosen, "blocks": encoder.info()["blocks"]}
    serve(encode, sum(lengths), texts, args, extra)


def model_flops(model, lengths: list[int]) -> float:
    """2 x the non-embedding parameters a token passes x real tokens, plus attention: of a mixture-of-experts layer's
    experts (3D weights), the share each token is routed to (``num_experts_per_tok`` of them)."""
    from lm2vec.experts import ExpertLinears, is_fused_experts
    from lm2vec.quantization import parameter_count

    config = model.config.get_text_config()
    embedding = model.get_input_embeddings().weight.numel()
    experts = {m: len(m.up) for m in model.modules() if isinstance(m, ExpertLinears)}  # lowered, or fused:
    experts |= {m: m.num_experts for m in model.modules() if is_fused_experts(m)}
    idle = sum(parameter_count(m) * (1 - config.num_experts_per_tok / count) for m, count in experts.items())
    attention = sum(4 * config.num_hidden_layers * config.hidden_size * n * n for n in lengths)
    return 2 * (parameter_count(model) - embedding - idle) * sum(lengths) + attention


class _Opaque:
    """A value handed through a compiled region untouched: dynamo guards on its type, not on its contents."""

    def __init__(self, value):
        self.value = value


def compile_blocks(encoder) -> None:
    """Regional ``torch.compile`` of the encoder's model (tried, not kept: docs/performance.md): every
    transformer block compiled with dynamic shapes, so the element-wise work between the products (norms, rotary,
    SiLU, residual sums) fuses. The lowered linear layers and packed attention stay eager (graph breaks: their row
    blocks and per-length loops would specialise a graph per batch), and packing's segments pass as one opaque
    object, so that no batch's segment lengths become guards."""
    import torch
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from lm2vec import packing, quantization
    from lm2vec.blocks import block_modules

    lowered = (quantization.Int8Linear, quantization.Int8x2Linear, quantization.Bf16Linear, quantization.OneDnnLinear)
    for layer in lowered:
        layer.forward = torch.compiler.disable(layer.forward)

    def opaque(attention):
        @torch.compiler.disable
        def opaque_attention(module, query, key, value, attention_mask, segments=None, **kwargs):
            segments = segments.value if segments is not None else None
            return attention(module, query, key, value, attention_mask, segments=segments, **kwargs)

        return opaque_attention

    for name in (packing.PACKED, packing.PACKED_EAGER):
        AttentionInterface.register(name, opaque(ALL_ATTENTION_FUNCTIONS[name]))
    model = encoder.model
    forward = model.forward
    model.forward = lambda *a, segments=None, **kw: forward(*a, segments=segments and _Opaque(segments), **kw)
    for block in block_modules(model):
        block.forward = torch.compile(block.forward, dynamic=True)


def engine_encoder(encoder, mode: str):
    """``encoder`` with its forward pass in another engine, on the exported (cached) ONNX graph."""
    from lm2vec.onnx_backend import OnnxEncoder, onnx_encoder, onnx_graph

    graph = onnx_graph(encoder)
    if mode == "ort-fp32":
        return onnx_encoder(encoder, graph)
    if mode == "ort-int8":
        return onnx_encoder(encoder, matmul_nbits(graph))
    settings = encoder.settings() | {"batch_invariant": False}
    return OnnxEncoder(encoder.model, session=openvino_session(graph), **settings)


def matmul_nbits(graph: Path) -> Path:
    """The graph with 8-bit MatMulNBits weights (blocks of 32, symmetric), int8 activations (accuracy_level 4)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    out = graph.with_suffix(".q8-b32-acc4.onnx")
    if not out.is_file():
        quantizer = MatMulNBitsQuantizer(
            onnx.load(str(graph)), bits=8, block_size=32, is_symmetric=True, accuracy_level=4
        )
        quantizer.process()
        quantizer.model.save_model_to_file(str(out), use_external_data_format=False)
    return out


class _OpenVINOSession:
    """OpenVINO's compiled model behind ONNX Runtime's ``run`` call, so OnnxEncoder drives it unchanged."""

    def __init__(self, compiled):
        self.compiled = compiled

    def run(self, outputs, feeds):
        return [self.compiled(feeds)[self.compiled.output(0)]]


def openvino_session(graph: Path) -> _OpenVINOSession:
    import nncf
    import openvino
    import torch

    core = openvino.Core()
    model = nncf.compress_weights(core.read_model(str(graph)), mode=nncf.CompressWeightsMode.INT8_SYM)
    config = {"INFERENCE_NUM_THREADS": torch.get_num_threads(), "INFERENCE_PRECISION_HINT": "f32"}
    config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = "32"  # without the f32 hint avx512_bf16 CPUs silently run bf16
    return _OpenVINOSession(core.compile_model(model, "CPU", config))


def load_texts(kind: str, count: int, data: Path) -> list[str]:
    """STS-B test sentences (file order, unique) or SciFact documents (title and abstract, file order)."""
    if kind == "stsb":
        from lm2vec.evaluation import load_sts

        return load_sts("stsb", "test", data).interleaved_sentences()[:count]
    records = [json.loads(line) for line in (data / "retrieval" / "scifact" / "corpus.jsonl").open()]
    return [f"{r.get('title') or ''} {r['text']}".strip() for r in records[:count]]


class Worker:
    """A worker process for one mode, driven line by line over its stdin/stdout."""

    def __init__(
        self, mode: str, python: str, texts: Path, embeddings: Path, args: argparse.Namespace, prepare: bool = False
    ):
        command = [python, __file__, "--worker", mode, "--texts-file", str(texts), "--embeddings", str(embeddings)]
        command += ["--prepare"] if prepare else []
        command += ["--batch-size", str(args.batch_size), "--threads", str(args.threads)]
        command += ["--max-length", str(args.max_length), "--reference", str(args.reference)]
        command += ["--model", str(args.model)] if args.model else []
        command += ["--attention", args.attention] if args.attention else []
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def read(self) -> dict:
        for line in self.process.stdout:
            if line.startswith(REPLY):
                return json.loads(line.removeprefix(REPLY))
        raise RuntimeError(f"the worker exited with code {self.process.wait()} before replying")

    def send(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.read()


def first_load(mode: str, texts: Path, args: argparse.Namespace) -> dict:
    """Load ``mode``'s model once in a process of its own: its seconds and peak RSS (see :func:`lm2vec_worker`)."""
    worker = Worker(mode, sys.executable, texts, texts.with_name("unused.npy"), args, prepare=True)
    result = worker.read()
    worker.process.wait()
    return result


def matmul_peaks(threads: int, size: int = 2048, repeats: int = 3) -> dict[str, float]:
    """FLOP/s (ops/s for int8) of one size^3 product per precision, best of ``repeats`` after a warm-up; fp32 and
    int8 also in ONNX Runtime (MLAS: MatMul, MatMulInteger), whose kernels beat torch's on some CPUs."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)

    def best(product, a, b) -> float:
        product(a, b)
        fastest = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            product(a, b)
            fastest = min(fastest, time.perf_counter() - start)
        return 2 * size**3 / fastest

    ints = (torch.randint(-127, 128, (size, size), dtype=torch.int8) for _ in range(2))
    peaks = {
        "fp32 torch": best(torch.mm, torch.randn(size, size), torch.randn(size, size)),
        "bf16 torch": best(torch.mm, *(torch.randn(size, size, dtype=torch.bfloat16) for _ in range(2))),
        "int8 torch": best(torch._int_mm, *ints),
    }
    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    peaks["fp32 onnxruntime"] = best(_ort_product("MatMul", a, threads), a, None)
    peaks["int8 onnxruntime"] = best(_ort_product("MatMulInteger", a, threads), a.astype(np.uint8), None)
    return peaks


def _ort_product(op: str, a, threads: int):
    """One ``a @ B`` node in ONNX Runtime (B a constant of a's shape; uint8 x int8 for MatMulInteger)."""
    import numpy as np
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    integer = op == "MatMulInteger"
    b = np.ones(a.shape, dtype=np.int8 if integer else np.float32)
    kind, out = (TensorProto.UINT8, TensorProto.INT32) if integer else (TensorProto.FLOAT, TensorProto.FLOAT)
    graph = helper.make_graph(
        [helper.make_node(op, ["A", "B"], ["Y"])],
        "product",
        [helper.make_tensor_value_info("A", kind, list(a.shape))],
        [helper.make_tensor_value_info("Y", out, list(a.shape))],
        [numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return lambda x, _: session.run(None, {"A": x})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", choices=["stsb", "scifact"], default="stsb")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per mode (after one warm-up)")
    parser.add_argument("--modes", default=DEFAULT_MODES, help="comma-separated, from: " + MODE_NAMES)
    parser.add_argument("--model", type=Path, help="a trained encoder directory (default: the built-in model)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--attention", choices=["sdpa", "eager"], help="every mode's attention (default: the model's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--data", type=Path, default=None, help="the datasets folder (default: LM2VEC_DATA)")
    parser.add_argument("--reference", type=Path, default=REFERENCE_DIR, help="the reference's set-up folder")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--texts-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--embeddings", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        texts = json.loads(args.texts_file.read_text())
        (reference_worker if args.worker == "reference" else lm2vec_worker)(args, texts)
        return
    run(args)


def run(args: argparse.Namespace) -> None:
    import numpy as np

    from lm2vec.datafiles import data_dir
    from lm2vec.evaluation import cosine_rows
    from lm2vec.hardware import cpu_info, describe_cpu

    modes = args.modes.split(",")
    unknown = set(modes) - {"reference", *LM2VEC_MODES}
    if unknown:
        sys.exit(f"unknown mode(s) {sorted(unknown)}; choose from: {MODE_NAMES}")
    missing = [mode for mode in modes if not all(find_spec(name) for name in NEEDS.get(mode.split("-")[0], ()))]
    if missing:
        sys.exit(f"mode(s) {missing} need packages not installed here: pip install -e '.[onnx,bench]'")
    reference_python = args.reference / "venv" / "bin" / "python"
    if "reference" in modes and not (reference_python.is_file() and (args.reference / "smollm2-hf").is_dir()):
        sys.exit(f"the reference is not set up in {args.reference}: run `make reference` (or pass --reference DIR)")
    texts = load_texts(args.texts, args.count, args.data or data_dir())
    print(f"CPU: {describe_cpu()}")
    with tempfile.TemporaryDirectory() as tmp:
        texts_file = Path(tmp) / "texts.json"
        texts_file.write_text(json.dumps(texts))
        # A first load in a lowering dtype calibrates and converts the model, once per machine and model (cached):
        # done and reported here, once per dtype, so the timed workers' peak RSS is that of every later load.
        by_dtype: dict[str | None, str] = {}
        for mode in modes:
            by_dtype.setdefault(LM2VEC_MODES.get(mode), mode)
        first_loads = {m: first_load(m, texts_file, args) for dtype, m in by_dtype.items() if dtype in LOWERING}
        workers: dict[str, Worker] = {}
        setup = {}
        for mode in modes:  # one at a time: each load and warm-up alone
            python = str(reference_python) if mode == "reference" else sys.executable
            workers[mode] = Worker(mode, python, texts_file, Path(tmp) / f"{mode}.npy", args)
            setup[mode] = workers[mode].read()  # loaded and warmed up, then idle until timed
        peaks = matmul_peaks(args.threads)  # workers idle, waiting on stdin
        seconds: dict[str, list[float]] = {mode: [] for mode in modes}
        for _ in range(args.repeats):
            for mode, w in workers.items():
                seconds[mode].append(w.send("run")["seconds"])
        peak_rss = {mode: w.send("stop")["peak_rss_mb"] for mode, w in workers.items()}
        for w in workers.values():
            w.process.wait()
        embeddings = {mode: np.load(Path(tmp) / f"{mode}.npy") for mode in modes}

    from lm2vec.encoder import CPU_MAX_TOKENS  # here: the reference's workers run this file without lm2vec

    lm2vec_setup = setup.get("fp32") or next((s for m, s in setup.items() if m != "reference"), None)
    flops = lm2vec_setup["flops"] if lm2vec_setup else None  # of the float32 model: the same work in every mode
    tokens = lm2vec_setup["tokens"] if lm2vec_setup else setup["reference"]["tokens"]
    print(
        f"{len(texts)} {args.texts} texts ({tokens / len(texts):.1f} tokens each), batch {args.batch_size} "
        f"(lm2vec: and at most {CPU_MAX_TOKENS} tokens, its CPU default), "
        f"{args.threads} threads, max length {args.max_length}, {args.attention or 'default'} attention; warm-up on "
        f"one batch, then {args.repeats} timed runs per mode, alternating"
    )
    print("matmul peak (2048^3): " + ", ".join(f"{k} {v / 1e12:.3f} TFLOP/s" for k, v in peaks.items()))
    best = {p: max(v for k, v in peaks.items() if k.startswith(p)) for p in ("fp32", "bf16", "int8")}
    if "default" in modes:
        print(f"default: dtype={setup['default']['dtype']}, blocks {setup['default']['blocks']}")
    if "default-compiled" in modes:
        compile_s = setup["default-compiled"]["compile_s"]
        print(f"default-compiled: torch.compile and its first pass over the texts took {compile_s:.0f} s")
    for mode, first in first_loads.items():
        print(
            f"{mode}: a first load, alone, {first['load_s']:.0f} s, peak RSS {first['peak_rss_mb']:.0f} MB "
            "(calibration and conversion where not cached yet for this machine and model)"
        )
    print(f"model: {args.model or 'the built-in SmolLM2-135M-Instruct (untrained)'}\n")
    base = statistics.median(seconds["reference"]) if "reference" in modes else None
    anchor_mode = "fp32" if "fp32" in modes else modes[0]
    anchor = embeddings[anchor_mode]
    header = f"{'mode':<18}{'sent/s':>8}{'tokens/s':>10}{'peak RSS':>10}{'vs ref':>8}{'TFLOP/s':>9}{'of peak':>9}"
    print(header + f"{'cos min':>9}{'cos mean':>10}   runs (s)")
    figures: dict[str, dict] = {}
    for mode in modes:
        median = statistics.median(seconds[mode])
        cosine = cosine_rows(embeddings[mode], anchor)
        rate = flops / median if flops else None
        figures[mode] = {
            "sentences_per_s": len(texts) / median,
            "tokens_per_s": setup[mode]["tokens"] / median,
            "peak_rss_mb": peak_rss[mode],
            "vs_reference": base / median if base else None,
            "model_tflops": rate / 1e12 if rate else None,
            "fraction_of_peak": rate / best[precision_of(mode, setup[mode])] if rate else None,
            "cosine_to_anchor_min": float(cosine.min()),
            "cosine_to_anchor_mean": float(cosine.mean()),
            "seconds": seconds[mode],
        }
        f = figures[mode]
        print(
            f"{mode:<18}{f['sentences_per_s']:>8.1f}{f['tokens_per_s']:>10.0f}{f['peak_rss_mb']:>7.0f} MB"
            f"{_fmt(f['vs_reference'], 'x'):>8}{_fmt(f['model_tflops'], ''):>9}{_fmt(f['fraction_of_peak'], '%'):>9}"
            f"{cosine.min():>9.4f}{cosine.mean():>10.5f}   " + ", ".join(f"{s:.1f}" for s in seconds[mode])
        )
    print(f"\n'cos min', 'cos mean': per-text cosine to the {anchor_mode} mode's embeddings")
    print("'of peak': model FLOP/s over the best matmul peak of the mode's precision (torch or ONNX Runtime)")
    if args.json:
        summary = {"cpu": cpu_info(), "texts": args.texts, "count": len(texts), "tokens": tokens, "flops": flops}
        summary |= {"batch_size": args.batch_size, "threads": args.threads, "repeats": args.repeats}
        summary |= {"matmul_peaks": peaks, "modes": figures, "first_loads": first_loads}
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {args.json}")


def precision_of(mode: str, setup: dict) -> str:
    """The matmul precision a mode's speed is measured against (the default's: the dtype it chose)."""
    if mode in ("default", "default-compiled"):
        return {"bfloat16": "bf16", "int8": "int8"}.get(setup["dtype"], "fp32")
    return PEAK_OF.get(mode, "fp32")


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.0f}%" if unit == "%" else f"{value:.2f}{unit}"


if __name__ == "__main__":
    main()
