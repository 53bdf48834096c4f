"""The ``optimum-lcqat`` command: quantize, eval, info, push, lm-eval, demo.

Exit codes: 0 success; 2 bad usage or bad input (a message names the problem and the fix);
1 an unexpected failure (traceback). Outputs are written to a temporary directory beside the
target and renamed into place, so an existing result is never half-overwritten.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2

logger = logging.getLogger("optimum_lcqat.cli")


class UsageError(Exception):
    """Bad input from the user: reported without a traceback, exit code 2."""


# ---------------------------------------------------------------------------- shared helpers
def _resolve_model(name: str) -> str:
    if name == "smollm2":
        from .assets import smollm2_path

        return str(smollm2_path())
    return name


def _load_texts(args) -> list[str]:
    """Texts from --text files, --split NAME, or --dataset NAME (Hugging Face datasets)."""
    from .data import SPLITS, read_text_files, split_texts

    chosen = [bool(getattr(args, "text", None)), bool(getattr(args, "split", None)), bool(getattr(args, "dataset", None))]
    if sum(chosen) != 1:
        raise UsageError("give exactly one of --text FILE..., --split {heldout,calibration,train} or --dataset NAME")
    if args.text:
        try:
            return read_text_files(args.text)
        except (FileNotFoundError, ValueError) as exc:
            raise UsageError(str(exc)) from None
    if args.split:
        if args.split not in SPLITS:
            raise UsageError(f"--split must be one of {SPLITS}")
        return split_texts(args.split)
    import datasets

    ds = datasets.load_dataset(args.dataset, args.dataset_config, split=args.dataset_split)
    if args.text_field not in ds.column_names:
        raise UsageError(f"dataset {args.dataset} has no column {args.text_field!r}; columns: {ds.column_names}")
    return [t for t in ds[args.text_field] if t]


def _add_text_source(p: argparse.ArgumentParser, what: str) -> None:
    g = p.add_argument_group(f"{what} text (exactly one)")
    g.add_argument("--text", nargs="+", metavar="FILE", help="local .txt/.md/.rst files (one text each) or .jsonl files (field 'text')")
    g.add_argument("--split", help="a bundled split: heldout (Python tutorial), calibration (pydoc topics), train (rest of the Python docs)")
    g.add_argument("--dataset", help="a Hugging Face datasets name (needs network or a local datasets cache)")
    g.add_argument("--dataset-config", default=None, help="datasets config name")
    g.add_argument("--dataset-split", default="test", help="datasets split (default: test)")
    g.add_argument("--text-field", default="text", help="datasets column holding the text (default: text)")


def _dtype(name: str):
    import torch

    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise UsageError(f"--dtype must be one of {sorted(table)}")
    return table[name]


def _load_model(path: str, dtype="float32", quantization_config=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import optimum_lcqat  # noqa: F401  (registers lcqat)

    path = _resolve_model(path)
    looks_local = path.startswith(("/", ".", "~")) or os.sep in path and Path(path.split(os.sep)[0]).exists()
    if not Path(path).is_dir() and (looks_local or path.count("/") != 1):
        raise UsageError(f"model {path!r} is neither a local directory nor a Hub id (org/name)")
    kw = {"dtype": _dtype(dtype)}
    if quantization_config is not None:
        kw["quantization_config"] = quantization_config
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kw)
        tok = AutoTokenizer.from_pretrained(path)
    except OSError as exc:  # missing files, no network for a Hub id, ...
        raise UsageError(f"cannot load {path!r}: {exc}") from None
    return model, tok, path


def _print_json(obj, as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj, indent=2, default=str))
    else:
        width = max(len(k) for k in obj) if obj else 0
        for k, v in obj.items():
            if isinstance(v, float):
                v = f"{v:.4g}"
            print(f"{k:<{width}}  {v}")


# ---------------------------------------------------------------------------- subcommands
def cmd_quantize(args) -> int:
    from .config import LCQATConfig
    from .hub import prepare_output_dir, save_atomically, write_model_card

    prepare_output_dir(args.output, args.overwrite)  # refuse before the long work
    calib = None
    if args.text or args.split or args.dataset:
        calib = _load_texts(args)
    try:
        cfg = LCQATConfig(
            codebook=args.codebook, vector_dim=args.vector_dim,
            hadamard_block_size=args.hadamard_block_size if args.hadamard_block_size == "full" else int(args.hadamard_block_size),
            dataset=calib, num_samples=args.num_samples, model_seqlen=args.seqlen, seed=args.seed,
            dense_dtype=args.dense_dtype, lm_head_int8=args.lm_head_int8,
            **({} if args.e2e_steps is None else {"ptq_e2e_steps": args.e2e_steps}),
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    src = _resolve_model(args.model)
    plan = _MemoryPlan(args, cfg, src, calib is not None)
    why = None  # why a PTQ runs in memory rather than streaming
    if calib is not None and not args.in_memory:
        if args.qat_tokens:
            why = "QAT needs the whole model in memory"
        elif not Path(src).is_dir():
            why = f"{src!r} is not a local folder"
        else:
            # models that fit run in memory; big ones (or any with --e2e-steps 0) take the streaming
            # PTQ (one float block in memory; its end-to-end stage runs on the 2-bit model after)
            size = _weights_bytes(src)
            if cfg.ptq_e2e_steps == 0 or size > STREAM_ABOVE_BYTES:
                if cfg.ptq_e2e_steps:
                    logger.info("lcqat quantize: streaming PTQ (%.1f GiB of weights, above %d GiB), its end-to-end "
                                "stage on the 2-bit model; --in-memory runs it all in memory", size / 2**30,
                                STREAM_ABOVE_BYTES >> 30)
                return _quantize_streaming(args, cfg, src, plan)
            if not plan.fits_in_memory():
                print(f"lcqat quantize: {plan.in_memory.describe()}, above the {plan.budget / 2**30:.2f} GiB "
                      f"available ({plan.source}): streaming PTQ instead, one block at a time, its end-to-end "
                      "stage on the 2-bit model (--in-memory runs it all in memory, if memory is freed first)",
                      flush=True)
                return _quantize_streaming(args, cfg, src, plan)
            why = (f"with {cfg.ptq_e2e_steps} end-to-end steps, {size / 2**30:.2f} GiB of weights; --e2e-steps 0 "
                   "streams one block at a time instead")
    if args.device is not None:
        raise UsageError("--device applies to the streaming PTQ (calibration text, a local folder, no --in-memory/"
                         "--qat-tokens; --e2e-steps 0 below 4 GiB of weights)")
    if why is not None:
        logger.info("lcqat quantize: in-memory PTQ (%s)", why)
    plan.require_in_memory(streamable_hint=calib is not None and not args.qat_tokens and Path(src).is_dir())
    model, tok, path = _load_model(args.model, args.dtype)
    cfg.tokenizer = tok  # the PTQ tokenizes its calibration text with it
    from .quant_api import quantize

    quantize(model, cfg)  # the float model, loaded once, quantized in place (data-free or PTQ)
    if args.qat_tokens:
        from .training.recipes import run_qat  # noqa: PLC0415

        qat_texts = _load_texts(argparse.Namespace(text=args.qat_text, split=None if args.qat_text else "train", dataset=None))
        run_qat(model, tok, qat_texts, tokens=args.qat_tokens, seqlen=args.seqlen, seed=args.seed)

    def write(tmp):
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_model_card(tmp, base_model=getattr(model.config, "_name_or_path", None) or args.model)

    out = save_atomically(args.output, write, overwrite=args.overwrite)
    print(f"saved 2-bit lcqat checkpoint to {out}")
    plan.report_peak()
    return EXIT_OK


class _MemoryPlan:
    """The peak each path of ``quantize`` would reach (memory_plan.py), predicted from the model's
    config before any weight loads, against the memory available; printed, then checked against
    the measured peak at the end."""

    def __init__(self, args, cfg, src: str, calibrated: bool):
        from . import memory_plan as mp

        self.args, self.cfg, self.check = args, cfg, not args.no_memory_check
        self.budget, self.source = mp.memory_budget()
        try:
            self.shape = mp.ModelShape.from_pretrained_config(src)
        except Exception as exc:  # noqa: BLE001  (no config.json, offline Hub id: loading says why, later)
            logger.warning("lcqat quantize: cannot predict the peak memory (%s: %s); going on without a check",
                           type(exc).__name__, exc)
            self.shape = self.in_memory = self.chosen = None
            return
        dtype_bytes = _dtype(args.dtype).itemsize
        if calibrated:
            est = mp.in_memory_ptq(self.shape, cfg, dtype_bytes=dtype_bytes)
            if args.qat_tokens:
                qat = mp.qat(self.shape, 4 * args.seqlen)
                est = qat if qat.total > est.total else est
        else:
            est = mp.data_free(self.shape, dtype_bytes=dtype_bytes)
        self.in_memory = est
        self.chosen = None

    def fits_in_memory(self) -> bool:
        return self.in_memory is None or self.in_memory.total <= self.budget

    def _choose(self, est, refuse_fix: str) -> None:
        from . import memory_plan as mp

        self.chosen = est
        print(f"lcqat quantize: {est.describe()}; {self.budget / 2**30:.2f} GiB available ({self.source})", flush=True)
        try:
            mp.check_fits(est, f"{refuse_fix} --no-memory-check runs it anyway.", (self.budget, self.source))
        except mp.MemoryPlanError as exc:
            if self.check:
                raise UsageError(str(exc)) from None
            logger.warning("lcqat quantize: predicted peak above the memory available; running anyway (--no-memory-check)")

    def require_in_memory(self, streamable_hint: bool) -> None:
        if self.in_memory is None:
            return
        fix = ("Leave out --in-memory to take the streaming PTQ (one block at a time), or free memory."
               if streamable_hint and self.args.in_memory else
               "Quantize with calibration text from a local folder without --qat-tokens (streaming PTQ), then "
               "run QAT on a machine with more memory; or free memory." if self.args.qat_tokens else
               "Use a machine with more memory, a local model folder and calibration text (streaming PTQ), or "
               "lower --num-samples / --e2e-steps.")
        self._choose(self.in_memory, fix)

    def require_streaming(self, act_bytes: int) -> None:
        if self.shape is None:
            return
        from . import memory_plan as mp

        est = mp.streaming_ptq(self.shape, self.cfg, dtype_bytes=_dtype(self.args.dtype).itemsize, act_bytes=act_bytes)
        e2e = any(k.startswith("end-to-end") for k in est.parts)
        self._choose(est, "--e2e-steps 0 skips the end-to-end stage on the 2-bit model, the largest part here; or free memory."
                     if e2e else "Lower --num-samples or --seqlen (calibration activations), or free memory.")

    def report_peak(self) -> None:
        from .init.ptq_blocks import peak_rss_bytes

        if self.chosen is not None:
            print(f"lcqat quantize: peak RSS {peak_rss_bytes() / 2**30:.2f} GiB (predicted {self.chosen.total / 2**30:.2f} GiB)")


# Local models with more weight bytes than this are quantized by the streaming PTQ (cmd_quantize)
STREAM_ABOVE_BYTES = 4 << 30


def _weights_bytes(folder: str) -> int:
    """Bytes of the weight files (safetensors, else pytorch .bin) in a model folder."""
    files = list(Path(folder).glob("*.safetensors")) or list(Path(folder).glob("*.bin"))
    return sum(f.stat().st_size for f in files)


def _quantize_streaming(args, cfg, src: str, plan: _MemoryPlan) -> int:
    """PTQ one decoder block at a time, straight from the source safetensors (streaming.py)."""
    from transformers import AutoTokenizer

    act = None if args.activation_dtype == "compute" else _dtype(args.activation_dtype)
    plan.require_streaming((act or _dtype(args.dtype)).itemsize)

    from .hub import write_model_card
    from .streaming import quantize_streaming

    try:
        tok = AutoTokenizer.from_pretrained(src)
    except OSError as exc:
        raise UsageError(f"cannot load the tokenizer of {src!r}: {exc}") from None
    cfg.tokenizer = tok
    out = quantize_streaming(
        src, args.output, cfg, dtype=_dtype(args.dtype), activation_dtype=act, overwrite=args.overwrite,
        finalize=lambda tmp: write_model_card(tmp, base_model=src), device=args.device,
    )
    print(f"saved 2-bit lcqat checkpoint to {args.output} (streaming PTQ, {out['blocks']} blocks, "
          f"{out['seconds']:.1f}s)")
    plan.report_peak()
    return EXIT_OK


def cmd_eval(args) -> int:
    from .data import token_stream
    from .evaluation import perplexity

    texts = _load_texts(args)
    model, tok, path = _load_model(args.model, args.dtype)
    tokens = token_stream(texts, tok, max_tokens=args.max_tokens)
    if tokens.numel() < args.ctx:
        raise UsageError(f"the text has {tokens.numel()} tokens, fewer than --ctx {args.ctx}")
    res = perplexity(model, tokens, ctx=args.ctx, batch_size=args.batch_size, progress=True)
    res["model"] = path
    _print_json(res, args.json)
    if args.output:
        from ._atomic import write_text_atomic

        write_text_atomic(args.output, json.dumps(res, indent=2, default=str))
    return EXIT_OK


def cmd_info(args) -> int:
    from .hub import checkpoint_info

    try:
        info = checkpoint_info(args.checkpoint)
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from None
    if info["quant_method"] != "lcqat":
        raise UsageError(f"{args.checkpoint} is not an lcqat checkpoint (quant_method={info['quant_method']!r})")
    if not args.json:
        info = {k: v for k, v in info.items() if k != "config"}
    _print_json(info, args.json)
    return EXIT_OK


def cmd_push(args) -> int:
    from huggingface_hub import CommitOperationAdd, HfApi

    from .hub import CARD_NAME, checkpoint_info, model_card

    ckpt = Path(args.checkpoint)
    try:
        info = checkpoint_info(ckpt)
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from None
    if info["quant_method"] != "lcqat":
        raise UsageError(f"{ckpt} is not an lcqat checkpoint; quantize it first (optimum-lcqat quantize)")
    ops = [CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p)) for p in sorted(ckpt.iterdir()) if p.is_file()]
    if not (ckpt / CARD_NAME).exists() or args.regenerate_card:
        # The card is generated in memory: the user's folder is never modified by a push.
        card = model_card(info, base_model=args.base_model).encode("utf-8")
        ops = [o for o in ops if o.path_in_repo != CARD_NAME] + [CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=card)]
    api = HfApi(library_name="optimum-lcqat")
    repo = api.create_repo(args.repo_id, private=args.private, exist_ok=True)
    commit = api.create_commit(repo_id=repo.repo_id, operations=ops, commit_message=args.commit_message)
    print(f"pushed {len(ops)} files to {repo.repo_id}: {getattr(commit, 'commit_url', commit)}")
    return EXIT_OK


def cmd_lm_eval(args, rest: list[str]) -> int:
    import optimum_lcqat  # noqa: F401  (registers lcqat before lm-eval builds the model)
    from .tasks import TASKS_DIR

    if "--include_path" not in rest:
        rest = rest + ["--include_path", TASKS_DIR]
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as exc:
        missing = (exc.name or "").split(".")[0]
        what = "is not installed" if missing in ("", "lm_eval") else f"cannot be imported ({exc})"
        raise UsageError(f"lm-evaluation-harness {what}; this command needs the eval extra: "
                         f"pip install 'optimum-lcqat[eval]'") from None

    sys.argv = ["lm-eval"] + rest
    cli_evaluate()
    if _uses_vllm_backend(rest):
        # vLLM's engine (a spawned core process plus C++ threads) can abort the interpreter at
        # teardown ("terminate called without an active exception") after the results are written:
        # the run has succeeded by now, so stop the engine's processes ourselves and leave without
        # running the interpreter's finalisers (skipping them alone orphans the engine core, which
        # keeps our stdout open and runs on).
        _stop_child_processes()
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(EXIT_OK)
    return EXIT_OK


def _stop_child_processes(timeout: float = 15.0) -> None:
    """SIGTERM every process this one started (vLLM's engine core and its workers), then SIGKILL
    what is still there after ``timeout`` seconds. psutil is one of vLLM's own dependencies."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        try:
            child.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(children, timeout=timeout)
    for child in alive:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def _uses_vllm_backend(rest: list[str]) -> bool:
    for i, arg in enumerate(rest):
        if arg == "--model" and i + 1 < len(rest) and rest[i + 1] == "vllm":
            return True
        if arg == "--model=vllm":
            return True
    return False


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args)
    return EXIT_OK


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="optimum-lcqat",
        description="2-bit LC-QAT quantization for Hugging Face transformers models.",
        epilog="Exit codes: 0 ok, 2 bad usage or input, 1 unexpected failure.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log per-layer details")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model to 2 bits (PTQ, optional QAT) and save it",
                       description="Quantize MODEL (a local checkpoint, a Hub id, or 'smollm2' for the bundled model) and save a packed lcqat checkpoint to OUTPUT. Calibration text (--text/--split/--dataset) selects the Hessian-aware PTQ; without it the data-free initialisation is used.")
    q.add_argument("model", help="full-precision model: directory, Hub id, or 'smollm2'")
    q.add_argument("output", help="output directory (must not exist unless --overwrite)")
    _add_text_source(q, "calibration")
    q.add_argument("--num-samples", type=int, default=128, help="calibration samples (default 128)")
    q.add_argument("--seqlen", type=int, default=512, help="tokens per calibration/QAT sample (default 512)")
    q.add_argument("--codebook", default="affine", choices=["affine", "scalar"], help="codebook (default affine)")
    q.add_argument("--vector-dim", type=int, default=4, help="weights per code vector (default 4)")
    q.add_argument("--hadamard-block-size", default="128", help="power of two or 'full' (default 128)")
    q.add_argument("--e2e-steps", type=int, default=None,
                   help="end-to-end fine-tune steps after the block-wise PTQ (default 16; 0: none). Local models "
                        "with more than 4 GiB of weights (or with --e2e-steps 0) take the streaming PTQ, one float "
                        "block in memory at a time, and run these steps on the 2-bit model it wrote")
    q.add_argument("--qat-tokens", type=int, default=0, help="QAT for this many tokens after PTQ (default 0: none)")
    q.add_argument("--qat-text", nargs="+", metavar="FILE", help="QAT text files (default: the bundled train split)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default float32)")
    q.add_argument("--dense-dtype", default=None, choices=["bfloat16", "float16"],
                   help="save the tensors that are not 2-bit layers (embeddings, norms, lm_head) in this dtype "
                        "(default: as loaded, see --dtype); about halves an fp32 small model's file")
    q.add_argument("--lm-head-int8", action="store_true",
                   help="save the lm_head as int8 + one fp32 scale per row; it loads back as an int8 head "
                        "(a tied embedding is kept for the lookup)")
    q.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (only after the new one is complete)")
    q.add_argument("--in-memory", action="store_true",
                   help="PTQ with the whole float model loaded (default with calibration text: streaming, one decoder "
                        "block read from MODEL's safetensors at a time, memory flat in depth; a killed run resumes "
                        "when started again with the same arguments). QAT (--qat-tokens) and Hub ids use in-memory")
    q.add_argument("--activation-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32", "compute"],
                   help="streaming PTQ: dtype of the calibration activations kept between blocks (default bfloat16; "
                        "'compute': the --dtype, which gives the in-memory result exactly)")
    q.add_argument("--no-memory-check", action="store_true",
                   help="run the path even when its predicted peak memory (printed before the work starts) is above "
                        "the memory available (free memory, or OPTIMUM_LCQAT_MEMORY_LIMIT, e.g. 6GiB, when set)")
    q.add_argument("--device", default=None,
                   help="streaming PTQ: where each decoder block computes, e.g. cuda (default cpu); only the "
                        "current block goes there")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity of a model on text",
                       description="Perplexity over non-overlapping windows of --ctx tokens.")
    e.add_argument("model", help="checkpoint directory (lcqat or float), Hub id, or 'smollm2'")
    _add_text_source(e, "evaluation")
    e.add_argument("--ctx", type=int, default=512, help="window length in tokens (default 512)")
    e.add_argument("--max-tokens", type=int, default=None, help="evaluate at most this many tokens")
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--dtype", default="float32")
    e.add_argument("--json", action="store_true", help="print JSON")
    e.add_argument("--output", help="also write the result as JSON to this file")
    e.set_defaults(func=cmd_eval)

    i = sub.add_parser("info", help="what an lcqat checkpoint holds", description="Converted layers, bits per weight, size and format version, read from the headers (no weights loaded).")
    i.add_argument("checkpoint")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)

    u = sub.add_parser("push", help="push an lcqat checkpoint to the Hugging Face Hub with a model card")
    u.add_argument("checkpoint")
    u.add_argument("repo_id", help="org/name on the Hub")
    u.add_argument("--private", action="store_true")
    u.add_argument("--base-model", default=None, help="base model id for the card's metadata")
    u.add_argument("--commit-message", default="Upload LC-QAT 2-bit model")
    u.add_argument("--regenerate-card", action="store_true", help="replace the folder's README.md in the pushed files with a fresh card")
    u.set_defaults(func=cmd_push)

    l = sub.add_parser("lm-eval", help="lm-evaluation-harness's CLI with the lcqat plugin loaded (arguments pass through)",
                       description="Runs lm-eval's own command line after registering lcqat; the bundled offline tasks (lcqat_heldout_ppl, lcqat_heldout_lastword) are added with --include_path unless you pass one.", add_help=False)
    l.set_defaults(func=None)

    d = sub.add_parser("demo", help="the bundled end-to-end demo on SmolLM2-135M",
                       description="Quantize the bundled SmolLM2-135M to 2 bits (PTQ + short QAT), evaluate before and after on held-out text, save, generate a sample, print a report and write a PNG.")
    d.add_argument("--output", default="runs/demo", help="output directory (default runs/demo)")
    d.add_argument("--num-samples", type=int, default=32, help="PTQ calibration samples of 512 tokens (default 32)")
    d.add_argument("--qat-tokens", type=int, default=8192, help="QAT tokens after PTQ (default 8192; 0 to skip)")
    d.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens evaluated (default 16384)")
    d.add_argument("--data-free", action="store_true", help="skip PTQ (data-free initialisation)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--overwrite", action="store_true", default=True)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "lm-eval":
        try:
            return cmd_lm_eval(None, argv[1:])
        except UsageError as exc:
            print(f"optimum-lcqat lm-eval: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except SystemExit as exc:
            return int(exc.code or 0)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (UsageError, FileExistsError) as exc:
        print(f"optimum-lcqat {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as exc:  # config/checkpoint validation errors carry their own fix
        print(f"optimum-lcqat {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
