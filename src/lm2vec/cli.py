"""The ``lm2vec`` command: a thin layer over the library (which never imports this module)."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from packaging.requirements import Requirement

import lm2vec
from lm2vec.cache import cache_dir, cache_entries, prune
from lm2vec.choices import DEFAULT_DTYPE, DTYPE_CHOICES, PoolingMode
from lm2vec.datafiles import read_jsonl, read_lines
from lm2vec.training.config import STAGES, builtin_recipes  # light: names and settings, not what trains them

if TYPE_CHECKING:
    from lm2vec.inputs import Item

# The parser and the commands' checks import nothing heavy: `lm2vec --help` or a usage error answers at once; torch
# and transformers are imported by the commands that load a model.
BUILTIN_ALIASES = ("default", "builtin")
USAGE_ERRORS = (ValueError, TypeError, OSError)  # with lm2vec.ModelLoadError and AttentionError: is_usage_error
DISTRIBUTIONS = {"sklearn": "scikit-learn"}  # modules whose distribution has another name


def model_source(name: str) -> str | None:
    """``default``/``builtin`` mean the built-in model, which :func:`lm2vec.load` takes as None."""
    return None if name in BUILTIN_ALIASES else name


def read_inputs(path: Path, field: str) -> Sequence[Item]:
    """Texts from a .jsonl file (``field``, plus an optional per-line ``instruction``) or one per line."""
    if path.suffix == ".jsonl":
        records = read_jsonl(path, {field: str}, optional_fields={"instruction": str})
        return [(r["instruction"], r[field]) if "instruction" in r else r[field] for r in records]
    return read_lines(path)


DTYPE_HELP = "default: auto, this machine's fastest path that stays float32-grade (see `lm2vec info`)"


def quiet_transformers() -> None:
    """transformers' per-tensor loading bars off (ours show the real work); called where a command starts loading,
    after its checks, since importing transformers takes a second."""
    import transformers

    transformers.utils.logging.disable_progress_bar()


def load(args: argparse.Namespace, model: str | None = None) -> lm2vec.Encoder:
    quiet_transformers()
    return lm2vec.load(
        model_source(model or args.model),
        pooling=args.pooling,
        bidirectional=False if args.causal else None,
        # ONNX Runtime exports the float32 model and runs its own kernels
        dtype="float32" if getattr(args, "backend", "torch") == "onnx" else getattr(args, "dtype", DEFAULT_DTYPE),
        max_length=getattr(args, "max_length", None),
    )


def cmd_encode(args: argparse.Namespace) -> int:
    from lm2vec.encoder import model_positions

    items = read_inputs(Path(args.input), args.field)
    check_writable(Path(args.output))  # before the model loads and the texts are embedded, not after
    encoder = load(args)
    if args.backend == "onnx":
        from lm2vec.onnx_backend import onnx_encoder

        encoder = onnx_encoder(encoder)  # exported once into the cache
    start = time.perf_counter()
    embeddings = encoder.encode(
        items,
        prompt_name=args.prompt_name,
        instruction=args.instruction,
        batch_size=args.batch_size,
        show_progress_bar=True,
        normalize_embeddings=args.normalize,
    )
    seconds = time.perf_counter() - start
    with open(args.output, "wb") as out:  # np.save(path) would append .npy to other names
        np.save(out, np.asarray(embeddings, dtype=np.float32))
    attention = "bidirectional" if encoder.bidirectional else "causal"
    print(
        f"lm2vec: wrote {embeddings.shape[0]} x {embeddings.shape[1]} embeddings to {args.output} in {seconds:.1f} s "
        f"({len(items) / max(seconds, 1e-9):.1f} texts/s; {attention} (verified), {encoder.pooling.value} pooling)",
        file=sys.stderr,
    )
    if cut := encoder.truncated(items, prompt_name=args.prompt_name, instruction=args.instruction):
        first = ", ".join(str(i + 1) for i in cut[:5]) + (", ..." if len(cut) > 5 else "")
        positions = model_positions(encoder.model.config)
        more = (
            "the model has no more positions: split them, or see late chunking (encoder.late_chunks)"
            if positions is not None and encoder.max_length >= positions
            else "raise --max-length to embed more of them"
        )
        print(
            f"lm2vec: {len(cut)} of {len(items)} texts were longer than {encoder.max_length} tokens and only their "
            f"beginning was embedded (texts {first}); {more}",
            file=sys.stderr,
        )
    return 0


def check_writable(path: Path) -> None:
    folder = path.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise OSError(f"cannot write {path}: {folder} is not a writable folder")


def cmd_info(args: argparse.Namespace) -> int:
    from lm2vec.hardware import describe_cpu
    from lm2vec.quantization import linear_speeds

    encoder = load(args)
    measured = linear_speeds()
    machine = {"cpu": describe_cpu(), "linear_speeds": measured}
    info = encoder.info() | {"attention_verified": True, "machine": machine}  # load() raises unless proven
    speeds = ", ".join(f"{name} {speed:.2f}x" for name, speed in measured.items())
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    rows = {
        "architecture": info["architecture"],
        "parameters": f"{info['parameters']:,}",
        "attention": f"{info['attention']} (verified)",
        "attn implementation": info["attn_implementation"],
        "pooling": info["pooling"] + (", normalized" if info["normalize"] else ""),
        "similarity": info["similarity_fn_name"],
        "dimension": f"{info['dimension']}" + (f" (Dense {info['dense']})" if info["dense"] else ""),
        "max length": info["max_length"],
        "dtype": f"{info['dtype']}" + (" (auto)" if args.dtype == "auto" else ""),
        "blocks": info["blocks"],
        "engine": info["engine"],
        "batch invariant": "bit-identical" if info["batch_invariant"] else "cosine > 0.99999",
        "batches": "packed (no padding computed)" if info["packed"] else "padded",
        "this machine": f"{describe_cpu()}; linear layers vs float32: {speeds}",
    }
    if info["prompts"]:
        rows["prompts"] = ", ".join(info["prompts"]) + (" (pooled with the text)" if info["include_prompt"] else "")
    if info["matryoshka_dims"]:
        rows["matryoshka"] = "trained for " + ", ".join(map(str, info["matryoshka_dims"])) + " dimensions"
    for key, value in rows.items():
        print(f"{key:<20} {value}")
    return 0


def run_name(model: str, args: argparse.Namespace) -> str:
    name = "smollm2-135m-instruct" if model_source(model) is None else Path(model).name or model
    return name + (" (causal)" if args.causal else "") + (f" [{args.pooling}]" if args.pooling else "")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from lm2vec.evaluation import report, tasks

    for name in args.tasks:
        tasks.get_task(name)  # an unknown task fails before any model is loaded
    Path(args.output).mkdir(parents=True, exist_ok=True)  # and a report folder that cannot be made
    instructions = {} if args.no_instructions else tasks.load_instructions(args.instructions)
    runs: report.Runs = {}
    for path in args.compare:
        runs |= report.load_results(path)
    for model in args.models:
        encoder = load(args, model)
        results = tasks.run_tasks(
            encoder,
            args.tasks,
            data=args.data,
            cache_dir=None if args.no_cache else args.cache,
            instructions=instructions,
            full=args.full,
            batch_size=args.batch_size,
            show_progress_bar=True,
        )
        runs[run_name(model, args)] = results
        for r in results:
            print(f"{run_name(model, args)}  {r.task:<22} {r.main_metric:<14} {r.main_score:6.2f}  ({r.seconds:.0f} s)")
    meta = {"tasks": args.tasks, "full": args.full, "instructions": not args.no_instructions}
    paths = report.write_report(Path(args.output), runs, meta)
    print(paths["markdown"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    return 0


def parse_settings(pairs: list[str]) -> dict[str, object]:
    """``key=value`` pairs; values are read as JSON where they parse (numbers, true, lists), else as strings."""
    settings: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes key=value, got {pair!r}")
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:
            settings[key] = value
    return settings


def cmd_train(args: argparse.Namespace) -> int:
    from lm2vec import training

    settings = json.loads(Path(args.config).read_text()) if args.config else {}
    config = training.stage_config(args.stage, settings | parse_settings(args.set))  # checked before loading
    from lm2vec.training.data import check_data
    from lm2vec.training.stage import claim_for_model, claim_stage_dir

    check_data(config.data, args.data)
    claim_stage_dir(args.output, config, args.resume)
    claim_for_model(args.output, model_source(args.model), args.resume)
    quiet_transformers()
    try:
        encoder = training.STAGES[args.stage].train(
            model_source(args.model), config, args.output, data_root=args.data, resume=args.resume
        )
    except training.NonFiniteLossError as err:
        print(f"lm2vec: training stopped: {err}", file=sys.stderr)
        return 1
    print(f"lm2vec: {args.stage} done; encoder ({encoder.dim} dimensions) saved in {Path(args.output) / 'encoder'}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from lm2vec import training

    recipe = training.load_recipe(args.recipe)  # unknown recipes and keys fail before any model loads
    options = dict(
        data_root=args.data,
        resume=args.resume,
        evaluate=not args.no_eval,
        baselines=not args.no_baselines,
        causal=args.causal,
    )
    quiet_transformers()
    try:
        if args.seeds:
            training.convert_seeds(model_source(args.model), recipe, args.output, args.seeds, **options)
        else:
            training.convert(model_source(args.model), recipe, args.output, **options)
    except training.NonFiniteLossError as err:
        print(f"lm2vec: training stopped: {err}; fix the cause, then rerun with --resume", file=sys.stderr)
        return 1
    print((Path(args.output) / "results.md").read_text() if not args.no_eval else "")
    encoders = Path(args.output) / ("seed-*/encoder" if args.seeds else "encoder")
    print(f"lm2vec: final encoder saved in {encoders}", file=sys.stderr)
    return 0


def whole_number(low: int, high: float, name: str) -> Callable[[str], int]:
    """An argument type for counts, limits and ports, checked as the command line is parsed (before any loading)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{name}, got {text!r}")
        return value

    return parse


positive_int = whole_number(1, math.inf, "a positive integer")
port_number = whole_number(0, 65535, "a port number (0-65535)")


def seed_list(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds are comma-separated integers, e.g. 1,2,3; got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds must differ, got {text!r}")
    return seeds


def cmd_serve(args: argparse.Namespace) -> int:
    from lm2vec.server import ServerSettings, serve

    encoder = load(args)
    name = args.name or (BUILTIN_ALIASES[0] if model_source(args.model) is None else Path(args.model).name)
    settings = ServerSettings(
        model_name=name,
        api_key=args.api_key or os.environ.get("LM2VEC_API_KEY"),
        max_inputs=args.max_inputs,
        max_chars=args.max_chars,
        max_request_tokens=args.max_request_tokens,
        max_batch_tokens=args.max_batch_tokens,
        max_batch_texts=args.max_batch_texts,
        max_queued_tokens=args.max_queued_tokens,
        drain_seconds=args.drain_seconds,
        normalize=not args.no_normalize,
    )
    info = encoder.info()
    runs = f"{encoder.dtype}{' (auto)' if args.dtype == 'auto' else ''}, blocks {info['blocks']}, {info['engine']}"
    print(f"lm2vec: serving {name!r} ({runs}) on http://{args.host}:{args.port}/v1/embeddings", file=sys.stderr)
    serve(encoder, settings, host=args.host, port=args.port)
    return 0


def cmd_embed_corpus(args: argparse.Namespace) -> int:
    from lm2vec.corpus import embed_corpus

    quiet_transformers()
    rows = embed_corpus(
        args.inputs,
        args.output,
        model_source(args.model),
        text_column=args.text_column,
        workers=args.workers,
        threads_per_worker=args.threads_per_worker,
        batch_size=args.batch_size,
        dtype=args.dtype,
        address=args.address,
    )
    print(f"lm2vec: wrote {rows} rows with embeddings to {args.output}", file=sys.stderr)
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    """List the cache by kind, or remove what has not been used for ``--prune`` days."""
    if args.prune is not None:
        removed = prune(args.prune, dry_run=args.dry_run)
        for entry in removed:
            print(f"{'would remove' if args.dry_run else 'removed'} {entry.path} ({size_text(entry.size)})")
        print(f"{len(removed)} entries, {size_text(sum(e.size for e in removed))}, unused for {args.prune:g}+ days")
        return 0
    entries = cache_entries()
    print(f"{cache_dir()}: {len(entries)} entries, {size_text(sum(e.size for e in entries))}")
    print(f"{'kind':<14}{'entries':>8}{'size':>11}   least / most recently used")
    for kind in sorted({e.kind for e in entries}):
        of_kind = [e for e in entries if e.kind == kind]  # least recently used first
        oldest, newest = (when(e.last_used) for e in (of_kind[0], of_kind[-1]))
        print(f"{kind:<14}{len(of_kind):>8}{size_text(sum(e.size for e in of_kind)):>11}   {oldest} / {newest}")
    return 0


def when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds))


def size_text(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lm2vec", description=lm2vec.__doc__)
    parser.add_argument("--version", action="version", version=f"lm2vec {lm2vec.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    model = argparse.ArgumentParser(add_help=False)
    model.add_argument(
        "model", help="'default' (the built-in SmolLM2-135M-Instruct), a model directory, a .gguf file or a hub id"
    )
    model.add_argument("--pooling", choices=[m.value for m in PoolingMode], help="default: the model's saved setting")
    model.add_argument("--causal", action="store_true", help="keep causal attention (default: bidirectional)")
    model.add_argument("--dtype", choices=DTYPE_CHOICES, default=DEFAULT_DTYPE, help=DTYPE_HELP)

    encode = commands.add_parser("encode", parents=[model], help="embed a text or .jsonl file into an .npy array")
    encode.add_argument("input", help="a text file (one text per line, blank lines skipped) or a .jsonl file")
    encode.add_argument("-o", "--output", required=True, help="the .npy file to write, shape (texts, dim)")
    prompt = encode.add_mutually_exclusive_group()
    prompt.add_argument("--instruction", help="instruction for every text (attended to, not pooled)")
    prompt.add_argument("--prompt-name", help="a named prompt saved with the model, e.g. query")
    encode.add_argument("--batch-size", type=positive_int, default=32)
    encode.add_argument("--max-length", type=positive_int, help="tokens per text (default: the model's setting)")
    encode.add_argument("--normalize", action="store_true", help="L2-normalize the embeddings")
    encode.add_argument("--backend", choices=["torch", "onnx"], default="torch", help="onnx: ONNX Runtime (CPU)")
    encode.add_argument("--field", default="text", help="the text field of .jsonl lines (default: text)")
    encode.set_defaults(run=cmd_encode)

    evaluate = commands.add_parser(
        "evaluate", help="score models on MTEB-style tasks; write results.json, results.md, results.png"
    )
    evaluate.add_argument("models", nargs="+", metavar="MODEL", help="one or more models (or training stages)")
    evaluate.add_argument(
        "--tasks",
        nargs="+",
        default=["stsb", "scifact", "banking77", "twentynewsgroups", "snli", "conll2003"],
        help="task names (default: the six standard ones; an unknown name lists the known ones)",
    )
    evaluate.add_argument("-o", "--output", default="eval-results", help="folder for the report (default: %(default)s)")
    evaluate.add_argument("--data", type=Path, help="the datasets folder (default: LM2VEC_DATA or ../shared/data)")
    evaluate.add_argument("--full", action="store_true", help="all the data, not the CPU-budget samples")
    evaluate.add_argument("--compare", nargs="*", default=[], help="earlier results.json files to put beside")
    evaluate.add_argument("--instructions", help="a JSON file of instructions per task (default: the packaged one)")
    evaluate.add_argument("--no-instructions", action="store_true", help="embed texts without instructions")
    evaluate.add_argument("--cache", type=Path, default=cache_dir() / "embeddings", help="embedding cache folder")
    evaluate.add_argument("--no-cache", action="store_true", help="do not read or write the embedding cache")
    evaluate.add_argument("--batch-size", type=positive_int, default=32)
    evaluate.add_argument("--dtype", choices=DTYPE_CHOICES, default=DEFAULT_DTYPE, help=DTYPE_HELP)
    evaluate.add_argument("--pooling", choices=[m.value for m in PoolingMode], help="default: the model's setting")
    evaluate.add_argument("--causal", action="store_true", help="keep causal attention (default: bidirectional)")
    evaluate.set_defaults(run=cmd_evaluate)

    train = commands.add_parser("train", help=f"run one training stage ({', '.join(STAGES)}) on a model")
    train.add_argument("stage", choices=list(STAGES))
    train.add_argument("model", help="'default', a model or encoder directory, a .gguf file or a hub id")
    train.add_argument("-o", "--output", required=True, help="folder for checkpoints, log.jsonl and encoder/")
    train.add_argument("--config", help="a JSON file of stage settings")
    train.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="stage settings, e.g. steps=100")
    train.add_argument("--data", type=Path, help="the datasets folder (default: LM2VEC_DATA or ../shared/data)")
    train.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    train.set_defaults(run=cmd_train)

    convert = commands.add_parser("convert", help="run a recipe's stages in order, scoring STS-B after each")
    convert.add_argument("model", help="'default', a model directory, a .gguf file or a hub id")
    recipes = ", ".join(builtin_recipes())
    convert.add_argument("--recipe", default="cpu", help=f"a packaged recipe ({recipes}) or a JSON file")
    convert.add_argument("-o", "--output", required=True, help="folder for the stages, results.md and encoder/")
    convert.add_argument("--data", type=Path, help="the datasets folder (default: LM2VEC_DATA or ../shared/data)")
    convert.add_argument("--resume", action="store_true", help="reuse finished stages, continue the interrupted one")
    convert.add_argument("--no-eval", action="store_true", help="skip the STS-B scores")
    convert.add_argument("--no-baselines", action="store_true", help="skip scoring the untrained model")
    convert.add_argument(
        "--causal", action="store_true", help="ablation: the contrastive stages on the causal model (no MNTP)"
    )
    convert.add_argument(
        "--seeds",
        type=seed_list,
        help="e.g. 1,2,3: one run per seed in OUTPUT/seed-N, and OUTPUT/results.md with each row's mean +- sd",
    )
    convert.set_defaults(run=cmd_convert)

    serve = commands.add_parser("serve", parents=[model], help="an OpenAI-compatible /v1/embeddings server")
    serve.add_argument("--host", default="127.0.0.1", help="default: loopback only; 0.0.0.0 to serve the network")
    serve.add_argument("--port", type=port_number, default=8000)
    serve.add_argument("--name", help="the model name clients send (default: the model's folder name)")
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: LM2VEC_API_KEY, else none)")
    serve.add_argument("--max-length", type=positive_int, help="tokens per text (default: the model's setting)")
    serve.add_argument("--max-inputs", type=positive_int, default=2048, help="texts per request (default: %(default)s)")
    serve.add_argument(
        "--max-chars", type=positive_int, default=100_000, help="characters per text (default: %(default)s)"
    )
    serve.add_argument(
        "--max-request-tokens", type=positive_int, default=300_000, help="tokens per request (%(default)s)"
    )
    serve.add_argument(
        "--max-batch-tokens",
        type=positive_int,
        help="tokens per model call; requests take turns (default: 2048 CPU, 16384 GPU)",
    )
    serve.add_argument("--max-batch-texts", type=positive_int, default=256, help="texts per model call (%(default)s)")
    serve.add_argument(
        "--max-queued-tokens", type=positive_int, help="beyond it 503 + Retry-After (default: 4 x --max-request-tokens)"
    )
    serve.add_argument("--drain-seconds", type=float, default=30.0, help="on SIGTERM, time to finish (%(default)s)")
    serve.add_argument("--no-normalize", action="store_true", help="raw vectors instead of unit length")
    serve.set_defaults(run=cmd_serve)

    corpus = commands.add_parser("embed-corpus", help="embed large corpora with Ray Data into Parquet files")
    corpus.add_argument("model", help="'default', or a model path every worker can read, or a hub id")
    corpus.add_argument("inputs", nargs="+", help=".txt (one text per line), .jsonl or .parquet files")
    corpus.add_argument("-o", "--output", required=True, help="folder for the Parquet files")
    corpus.add_argument("--text-column", default="text", help="the column to embed (default: text)")
    corpus.add_argument("--workers", type=positive_int, default=2, help="encoder workers (default: 2)")
    corpus.add_argument("--threads-per-worker", type=positive_int, default=1)
    corpus.add_argument("--batch-size", type=positive_int, default=32)
    corpus.add_argument("--dtype", choices=DTYPE_CHOICES, default=DEFAULT_DTYPE, help=DTYPE_HELP)
    corpus.add_argument("--address", help="a Ray cluster (ray://host:10001 or auto); default: a local instance")
    corpus.set_defaults(run=cmd_embed_corpus)

    cache = commands.add_parser("cache", help=f"what lm2vec keeps on disk ({cache_dir()}), and removing it")
    cache.add_argument("--prune", type=float, metavar="DAYS", help="remove entries unused for DAYS days (0: all)")
    cache.add_argument("--dry-run", action="store_true", help="with --prune: list what would go, remove nothing")
    cache.set_defaults(run=cmd_cache)

    info = commands.add_parser("info", parents=[model], help="load a model, verify its attention, describe it")
    info.add_argument("--json", action="store_true", help="print the description as JSON")
    info.set_defaults(run=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (*USAGE_ERRORS, RuntimeError) as err:
        if not is_usage_error(err):
            raise
        print(f"lm2vec: error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:  # a command of an optional extra (serve, onnx, corpus, mteb), not installed
        extra = extra_providing(err.name or "")
        if extra is None:
            raise
        print(f"lm2vec: error: {args.command} needs {err.name}: pip install 'lm2vec[{extra}]'", file=sys.stderr)
        return 2


def is_usage_error(err: Exception) -> bool:
    """A bad argument, file or model: said in one line, exit status 2 (a bug keeps its traceback)."""
    # lm2vec's own errors come from loading, when torch and transformers are imported already: no cost to ask then
    return isinstance(err, USAGE_ERRORS) or isinstance(err, (lm2vec.ModelLoadError, lm2vec.AttentionError))


def extra_providing(module: str) -> str | None:
    """The optional extra of lm2vec's package metadata that installs ``module`` (None if none does, or lm2vec runs
    from a source tree without metadata)."""
    top = module.split(".")[0]
    wanted = DISTRIBUTIONS.get(top, top).lower().replace("_", "-")
    try:
        metadata = importlib.metadata.metadata("lm2vec")
    except importlib.metadata.PackageNotFoundError:
        return None
    requirements = [Requirement(text) for text in metadata.get_all("Requires-Dist") or []]
    for extra in metadata.get_all("Provides-Extra") or []:
        for requirement in requirements:
            named = requirement.name.lower().replace("_", "-") == wanted
            if named and requirement.marker is not None and requirement.marker.evaluate({"extra": extra}):
                return extra
    return None


if __name__ == "__main__":  # python -m lm2vec.cli, e.g. under torchrun
    sys.exit(main())
