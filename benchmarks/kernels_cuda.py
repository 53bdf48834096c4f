"""This package's CUDA kernels on a GPU: per-layer benchmark, short decode benchmark, and the
report of scripts/gpu_check.sh (which runs all three; see there).

``layers``: for every (layer shape, batch, activation dtype), the whole LC layer through the
native op ``torch.ops.lcqat.lc_linear(x, packed, A, beta, s_u, s_v, bias, block_in, left_in,
block_out, left_out)`` (Hadamard + scales + 2-bit product + Hadamard), checked first against the
pure-torch oracle ``optimum_lcqat.kernels.reference.lc_forward`` in float64, then timed with
torch.utils.benchmark.Timer (which synchronizes the device) next to dense ``F.linear`` with the
dequantized weight in the same dtype. GB/s = weight bytes a call reads (LC: packed codes + fp32
A, beta, s_u, s_v; dense: the weight) / time, set against the device-to-device copy bandwidth
measured in the same run (``dst.copy_(src)`` of a buffer well above the L2 cache, counted as
read + write bytes, as bandwidth tests do). Unless ``--warm``, every call reads a different copy
of the weight, cycling through copies that together exceed twice the L2 cache, so that the
figures are DRAM figures (decode reads each layer once per token) and not L2 ones.

``decode``: greedy decode of SmolLM2-135M (the bundled checkpoint; a randomly initialised model
of the same shape with ``--random-weights`` or when it is missing: speed does not depend on the
values), batch 1, tokens/s from the second new token on (``generate`` of benchmarks/decode.py),
for dense bf16 and the 2-bit LC-QAT model (quantized data-free in flight) with fp32 and bf16
activations, round-robin. The LC layers run this package's CUDA kernels only with
OPTIMUM_LCQAT_CUDA_KERNELS=1; without it they take the PyTorch reference path (recorded).

``report``: merges what scripts/gpu_check.sh produced (step statuses, pytest's junit XML, the
layers and decode JSON) into benchmarks/results/gpu_check_<date>.json and .md.

    python benchmarks/kernels_cuda.py layers [--quick] [--out layers.json]
    OPTIMUM_LCQAT_CUDA_KERNELS=1 python benchmarks/kernels_cuda.py decode [--out decode.json]

Without a CUDA device, ``layers`` and ``decode`` print why and exit 0 (exit 2 with
``--require-cuda``); ``--device cpu`` runs the same steps on the CPU kernels, a dry run of the
script, not a GPU result.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
import xml.etree.ElementTree as ET

import torch
import torch.nn.functional as F
from torch.utils import benchmark

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import LAYER_SHAPES, RESULTS, environment, md_env  # noqa: E402

from optimum_lcqat._atomic import write_text_atomic  # noqa: E402

SHAPES = LAYER_SHAPES
QUICK = ("smollm2.gate/up (1536x576)", "smollm2.down (576x1536)", "llama7b.attn (4096x4096)",
         "llama7b.gate/up (11008x4096)")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Largest relative error (max |out - ref| / max |ref|) against the float64 oracle: the fp32 GEMV
# is fp32 maths; bf16/fp16 round the activations, the output and (batches above the GEMV's 8
# rows) the dequantized weight (as tests/test_kernels.py).
TOL = {"fp32": 1e-4, "bf16": 2e-2, "fp16": 2e-2}
CUDA_OPT_IN_ENV = "OPTIMUM_LCQAT_CUDA_KERNELS"
EXIT_NO_CUDA = 3  # argparse uses 2


# ------------------------------------------------------------------ shared
def write_atomic(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_text_atomic(path, text)


def device_or_exit(args) -> torch.device:
    """The device to measure on; without a usable CUDA device and native CUDA kernels, say why
    and exit (0, or EXIT_NO_CUDA with --require-cuda)."""
    from optimum_lcqat.kernels import native

    dev = torch.device(args.device)
    why = None
    if dev.type == "cuda":
        if torch.version.cuda is None:
            why = f"torch {torch.__version__} is a CPU-only build"
        elif not torch.cuda.is_available():
            why = f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device"
        elif not native.available():
            why = "the native extension is not built (python setup.py build_ext --inplace)"
        elif not native.cuda_built():
            why = "the native extension was built without CUDA kernels (needs nvcc / CUDA_HOME at build time)"
    elif dev.type != "cpu":
        raise SystemExit(f"--device {args.device}: only cuda (or cpu, for a dry run) is supported")
    elif not native.available():
        why = "the native extension is not built (python setup.py build_ext --inplace)"
    if why is not None:
        print(f"kernels_cuda.py {args.cmd}: skipped: {why}", flush=True)
        sys.exit(EXIT_NO_CUDA if args.require_cuda else 0)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def device_info(dev: torch.device) -> dict:
    if dev.type != "cuda":
        return {"type": "cpu"}
    p = torch.cuda.get_device_properties(dev)
    return {"type": "cuda", "name": p.name, "capability": f"{p.major}.{p.minor}",
            "memory_gib": round(p.total_memory / 2**30, 1), "multiprocessors": p.multi_processor_count,
            "l2_cache_mib": round(l2_bytes(dev) / 2**20, 1), "torch_cuda": torch.version.cuda}


def l2_bytes(dev: torch.device) -> int:
    if dev.type != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0) or 64 * 2**20)


def time_call(fn, min_run_time: float, threads: int) -> float:
    """Median seconds per call (torch.utils.benchmark; it synchronizes the device)."""
    t = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    return t.blocked_autorange(min_run_time=min_run_time).median


def cycled(tensors):
    """A function returning the next tensor of `tensors` at each call."""
    state = {"i": 0}

    def nxt():
        i = state["i"]
        state["i"] = (i + 1) % len(tensors)
        return tensors[i]

    return nxt


def n_copies(nbytes: int, dev: torch.device, warm: bool, cap_bytes: int = 2 * 2**30) -> int:
    """Copies of a weight of nbytes that together exceed twice the L2 cache (1 when warm)."""
    if warm or dev.type != "cuda":
        return 1
    want = math.ceil(2 * l2_bytes(dev) / max(nbytes, 1)) + 1
    return max(1, min(want, 4096, cap_bytes // max(nbytes, 1)))


# ------------------------------------------------------------------ layers
def copy_bandwidth(dev: torch.device, min_run_time: float, threads: int) -> dict:
    nbytes = max(256 * 2**20, 8 * l2_bytes(dev)) if dev.type == "cuda" else 64 * 2**20
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        nbytes = min(nbytes, free // 4)
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev).random_(0, 255)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t = time_call(lambda: dst.copy_(src), min_run_time, threads)
    ok = torch.equal(dst, src)
    del src, dst
    return {"buffer_bytes": nbytes, "us": t * 1e6, "gbps": 2 * nbytes / t / 1e9, "copy_verified": ok,
            "counted": "read + write bytes (2 x buffer) / time"}


def make_layer(m: int, n: int, block, seed: int):
    """A random LC weight (uniform codes) and bias, float64 parameters, on the CPU."""
    from optimum_lcqat.tensor.hadamard import plan_rotation
    from optimum_lcqat.tensor.lc_weight import LCWeight

    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (m, n // 4), dtype=torch.uint8, generator=g)
    A = (torch.eye(4) + 0.3 * torch.randn(4, 4, generator=g)).double()
    beta = (0.2 * torch.randn(4, generator=g)).double()
    s_u = torch.randn(n, generator=g).double()
    s_v = (torch.randn(m, generator=g) * 0.05).double()
    bias = (torch.randn(m, generator=g) * 0.1).double()
    return LCWeight(codes, A, beta, s_u, s_v, plan_rotation(n, block), plan_rotation(m, block)), bias


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def bench_layer(m, n, block, batches, dtypes, dev, args, seed) -> list[dict]:
    from optimum_lcqat.kernels import reference
    from optimum_lcqat.tensor.hadamard import hadamard_matrix

    w64, bias64 = make_layer(m, n, block, seed)
    w64d = w64.to(device=dev)  # the oracle runs on the device too (float64), it is plain torch
    bias64d = bias64.to(dev)
    f32 = lambda t: t.to(device=dev, dtype=torch.float32).contiguous()  # noqa: E731
    A, beta, s_u, s_v, bias = f32(w64.A), f32(w64.beta), f32(w64.s_u), f32(w64.s_v), f32(bias64)
    pi, po = w64.plan_in, w64.plan_out
    left_in = None if pi.left == 1 else f32(hadamard_matrix(pi.left))
    left_out = None if po.left == 1 else f32(hadamard_matrix(po.left))
    lc_bytes = m * n // 4 + 4 * (16 + 4 + m + n)
    codes = [w64.codes.to(dev)]
    codes += [codes[0].clone() for _ in range(n_copies(lc_bytes, dev, args.warm) - 1)]
    next_codes = cycled(codes)
    dense64 = reference.dense_weight(w64d)
    op = torch.ops.lcqat.lc_linear

    def lc(x):
        return op(x, next_codes(), A, beta, s_u, s_v, bias, pi.right, left_in, po.right, left_out)

    rows = []
    g = torch.Generator().manual_seed(seed + 1)
    for dname in dtypes:
        dt = DTYPES[dname]
        esize = torch.finfo(dt).bits // 8
        dense = [dense64.to(dt)]
        dense += [dense[0].clone() for _ in range(n_copies(m * n * esize, dev, args.warm) - 1)]
        next_dense = cycled(dense)
        bias_dt = bias.to(dt)
        for b in batches:
            x = torch.randn(b, n, generator=g).to(device=dev, dtype=dt)
            r = {"out": m, "in": n, "batch": b, "dtype": dname, "rotation_in": pi.description,
                 "rotation_out": po.description, "lc_copies": len(codes), "dense_copies": len(dense)}
            with torch.inference_mode():
                ref = reference.lc_forward(w64d, x.double(), bias64d)
                try:
                    out = lc(x)
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)  # a kernel fault shows here, on this configuration
                except Exception as exc:  # recorded as a failed check; the run goes on
                    r.update(check=False, rel_err=None, error=f"lcqat.lc_linear raised {type(exc).__name__}: {exc}")
                    rows.append(r)
                    continue
                r["rel_err"] = rel_err(out, ref)
                r["dense_rel_err"] = rel_err(F.linear(x, dense[0], bias_dt), ref)
                r["check"] = bool(out.dtype == dt and out.shape == ref.shape and r["rel_err"] < TOL[dname])
                if not r["check"]:
                    r["error"] = (f"lcqat.lc_linear disagrees with the reference: rel err {r['rel_err']:.3g} "
                                  f"(tolerance {TOL[dname]}), dtype {out.dtype}, shape {tuple(out.shape)}")
                    rows.append(r)
                    continue
                t_lc, t_dense = [], []
                for _ in range(args.rounds):  # interleaved, so that other load hits both alike
                    t_lc.append(time_call(lambda: lc(x), args.min_run_time, args.threads))
                    t_dense.append(time_call(lambda: F.linear(x, next_dense(), bias_dt), args.min_run_time, args.threads))
            tl, td = statistics.median(t_lc), statistics.median(t_dense)
            r["lc"] = {"us": tl * 1e6, "gbps": lc_bytes / tl / 1e9, "weight_bytes": lc_bytes,
                       "rounds_us": [v * 1e6 for v in t_lc]}
            r["dense"] = {"us": td * 1e6, "gbps": m * n * esize / td / 1e9, "weight_bytes": m * n * esize,
                          "rounds_us": [v * 1e6 for v in t_dense]}
            r["speedup_vs_dense"] = td / tl
            rows.append(r)
        del dense
    return rows


def cmd_layers(args) -> int:
    dev = device_or_exit(args)
    torch.manual_seed(0)
    env = environment()
    info = device_info(dev)
    names = [k for k in SHAPES if (not args.quick or k in QUICK) and (not args.only or any(s in k for s in args.only))]
    if not names:
        raise SystemExit(f"no layer shape matches --only {args.only}; shapes: {', '.join(SHAPES)}")
    print(f"device {dev}: {info}", flush=True)
    copy_bw = copy_bandwidth(dev, args.min_run_time, args.threads)
    print(f"device-to-device copy: {copy_bw['gbps']:.1f} GB/s (read + write, {copy_bw['buffer_bytes'] / 2**20:.0f} MiB buffer)",
          flush=True)
    print(f"{'layer':30s} {'dtype':>5s} {'batch':>5s} | {'LC us':>8s} {'GB/s':>7s} {'% copy':>6s} | "
          f"{'dense us':>8s} {'GB/s':>7s} | {'x':>5s} | rel err", flush=True)
    rows, failures = [], 0

    def save(partial: bool):  # after every layer, so that a run cut short keeps what it measured
        payload = {"env": env, "device": info, "args": {k: v for k, v in vars(args).items() if k != "func"},
                   "copy_bandwidth": copy_bw, "results": rows, "check_failures": failures, "partial": partial}
        write_atomic(args.out, json.dumps(payload, indent=1))

    for i, name in enumerate(names):
        m, n = SHAPES[name]
        for r in bench_layer(m, n, args.block, args.batches, args.dtypes, dev, args, seed=1000 + i):
            r["layer"] = name
            rows.append(r)
            if not r["check"]:
                failures += 1
                print(f"{name:30s} {r['dtype']:>5s} {r['batch']:5d} | FAILED: {r['error']}", flush=True)
                continue
            r["lc"]["pct_of_copy_bw"] = 100 * r["lc"]["gbps"] / copy_bw["gbps"]
            r["dense"]["pct_of_copy_bw"] = 100 * r["dense"]["gbps"] / copy_bw["gbps"]
            print(f"{name:30s} {r['dtype']:>5s} {r['batch']:5d} | {r['lc']['us']:8.1f} {r['lc']['gbps']:7.1f} "
                  f"{r['lc']['pct_of_copy_bw']:6.1f} | {r['dense']['us']:8.1f} {r['dense']['gbps']:7.1f} | "
                  f"{r['speedup_vs_dense']:5.2f} | {r['rel_err']:.1e}", flush=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        save(partial=i + 1 < len(names))
    print("wrote", args.out, flush=True)
    return 1 if failures else 0


# ------------------------------------------------------------------ decode
SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                     tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0)


def dense_model(args):
    """(model fp32 on the CPU, its checkpoint directory or None, input ids, description, tokenizer
    or None): SmolLM2-135M, or a random model of its shape."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if not args.random_weights:
        try:
            from transformers import AutoTokenizer

            from decode import PROMPT
            from optimum_lcqat.assets import smollm2_path

            path = smollm2_path()
            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            return model, path, tok(PROMPT, return_tensors="pt").input_ids, f"SmolLM2-135M-Instruct ({path})", tok
        except Exception as exc:  # the bundled checkpoint is an optional extra
            print(f"decode: SmolLM2 checkpoint unavailable ({type(exc).__name__}: {exc}); "
                  "using a random model of its shape", flush=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(**SMOLLM2_SHAPE)
    model = LlamaForCausalLM(cfg).float()
    ids = torch.randint(0, cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    return model, None, ids, "random model of SmolLM2-135M's shape", None


def lc_model(dense, src, dev, init_iters: int):
    """(the 2-bit LC-QAT version of `dense`, checkpoint `src` when not None, quantized data-free
    in flight with `init_iters`, fp32, on `dev`; where it was quantized). Quantized on `dev`
    (device_map), on the CPU when that fails."""
    import tempfile

    from transformers import AutoModelForCausalLM

    from optimum_lcqat import LCQATConfig

    with tempfile.TemporaryDirectory() as tmp:
        if src is None:
            dense.save_pretrained(tmp)
            src = tmp
        if dev.type == "cuda":
            try:
                model = AutoModelForCausalLM.from_pretrained(
                    src, dtype=torch.float32, quantization_config=LCQATConfig(init_iters=init_iters), device_map=str(dev))
                return model, f"quantized on {dev}"
            except Exception as exc:
                print(f"decode: quantizing on {dev} failed ({type(exc).__name__}: {exc}); quantizing on the CPU",
                      flush=True)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32,
                                                     quantization_config=LCQATConfig(init_iters=init_iters))
        return model.to(dev), "quantized on cpu"


def cmd_decode(args) -> int:
    dev = device_or_exit(args)
    from decode import generate

    from optimum_lcqat.kernels import backend_name, native

    if dev.type == "cpu":
        torch.set_num_threads(args.threads)
    env = environment()
    info = device_info(dev)
    t0 = time.perf_counter()
    dense, src, ids, desc, tok = dense_model(args)
    ids = ids.to(dev)
    models, build_s = {}, {}
    for v in args.variants:
        t1 = time.perf_counter()
        if v == "bf16":
            models[v] = copy.deepcopy(dense).to(device=dev, dtype=torch.bfloat16)
        elif v == "fp32":
            models[v] = copy.deepcopy(dense).to(dev)
        build_s[v] = time.perf_counter() - t1
    lc_variants = [v for v in args.variants if v.startswith("lcqat")]
    quant_note = None
    if lc_variants:
        t1 = time.perf_counter()
        lc, quant_note = lc_model(dense, src, dev, args.init_iters)
        for v in lc_variants:
            models[v] = lc if v == "lcqat_fp32" else copy.deepcopy(lc).to(dtype=torch.bfloat16)
            build_s[v] = time.perf_counter() - t1
        print(f"decode: LC model {quant_note} in {time.perf_counter() - t1:.1f}s", flush=True)
    del dense
    for model in models.values():
        model.eval()
    lc_path = "cuda kernels" if dev.type == "cuda" and native.cuda_kernels_enabled() else (
        "cpu kernels" if dev.type == "cpu" else "reference (torch ops on the GPU)")
    print(f"decode: {desc}; LC layers take: {lc_path} ({CUDA_OPT_IN_ENV}={os.environ.get(CUDA_OPT_IN_ENV, '')!r})",
          flush=True)
    texts, rates, first_ids = {}, {v: [] for v in models}, {}

    def save(partial: bool):  # after every round, so that a run cut short keeps what it measured
        results = {v: {"tok_s": statistics.median(rates[v]), "rounds_tok_s": rates[v], "build_s": build_s[v],
                       "new_token_ids": first_ids[v], "text": texts[v]} for v in models if rates[v]}
        base = results.get("bf16")
        for r in results.values():
            r["x_bf16"] = r["tok_s"] / base["tok_s"] if base else None
        if "lcqat_fp32" in results and "lcqat_bf16" in results:
            a, b = results["lcqat_fp32"]["new_token_ids"], results["lcqat_bf16"]["new_token_ids"]
            results["lcqat_bf16"]["tokens_equal_to_lcqat_fp32"] = next(
                (i for i, (p, q) in enumerate(zip(a, b)) if p != q), len(a))
        payload = {"env": env, "device": info, "args": {k: v for k, v in vars(args).items() if k != "func"},
                   "model": desc, "lc_quantization": quant_note, "lc_layers_path": lc_path,
                   "backend": backend_name(), "opt_in_env": os.environ.get(CUDA_OPT_IN_ENV, ""),
                   "total_s": time.perf_counter() - t0, "results": results, "partial": partial}
        write_atomic(args.out, json.dumps(payload, indent=1))

    for v, model in models.items():  # warm-up
        generate(model, ids, 4, False)
    for r in range(args.rounds):
        for v, model in models.items():
            rate, _, out = generate(model, ids, args.new_tokens, False)
            rates[v].append(rate)
            if r == 0:
                first_ids[v] = out[0, ids.shape[1]:].tolist()
                texts[v] = tok.decode(first_ids[v]) if tok is not None else None
        print(f"decode round {r}: " + ", ".join(f"{v} {rates[v][-1]:.1f} tok/s" for v in models), flush=True)
        save(partial=r + 1 < args.rounds)
    print("wrote", args.out, flush=True)
    return 0


# ------------------------------------------------------------------ report
def read_json(path):
    if path and os.path.isfile(path):
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError) as exc:
            return {"unreadable": f"{path}: {exc}"}
    return None


def read_steps(path) -> list[dict]:
    steps = []
    if path and os.path.isfile(path):
        with open(path) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) >= 4:
                    name, rc, secs, limit = parts[:4]
                    note = parts[4] if len(parts) > 4 else ""
                    rc = int(rc) if rc.lstrip("-").isdigit() else None
                    status = ("skipped" if rc is None else "ok" if rc == 0 else
                              "timed out" if rc in (124, 137) else f"failed (exit {rc})")
                    steps.append({"step": name, "exit": rc, "status": status, "seconds": int(secs or 0),
                                  "limit_s": int(limit or 0), "note": note})
    return steps


def read_junit(path) -> dict | None:
    if not path or not os.path.isfile(path):
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        return {"unreadable": str(exc)}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    out = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "seconds": 0.0, "failed": [], "skip_reasons": {}}
    for s in suites:
        for k in ("tests", "failures", "errors", "skipped"):
            out[k] += int(s.get(k, 0))
        out["seconds"] += float(s.get("time", 0))
        for case in s.iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            for tag in ("failure", "error"):
                el = case.find(tag)
                if el is not None:
                    out["failed"].append({"test": name, "message": (el.get("message") or "")[:500]})
            el = case.find("skipped")
            if el is not None:
                reason = (el.get("message") or "")[:200]
                out["skip_reasons"][reason] = out["skip_reasons"].get(reason, 0) + 1
    out["passed"] = out["tests"] - out["failures"] - out["errors"] - out["skipped"]
    return out


def cmd_report(args) -> int:
    steps = read_steps(os.path.join(args.work, "steps.tsv"))
    tests = read_junit(os.path.join(args.work, "pytest.xml"))
    layers = read_json(os.path.join(args.work, "layers.json"))
    decode = read_json(os.path.join(args.work, "decode.json"))
    decode_ref = read_json(os.path.join(args.work, "decode_reference.json"))
    try:
        env = environment()
    except Exception as exc:  # the report must be written whatever broke before it
        env = {"error": f"{type(exc).__name__}: {exc}"}
    env["nvidia_smi"] = args.nvidia_smi
    env["nvcc"] = args.nvcc
    env["device"] = device_info(torch.device("cuda")) if torch.cuda.is_available() else None
    # passed: some ran, none failed, and none was skipped for want of a GPU or the CUDA kernels
    cuda_skips = [r for r in (tests or {}).get("skip_reasons", {}) if "gpu" in r.lower() or "cuda" in r.lower()]
    tests_ok = bool(tests and "unreadable" not in tests and tests["passed"] > 0
                    and tests["failures"] == 0 and tests["errors"] == 0 and not cuda_skips)
    required = [s for s in steps if s["step"] in args.required]
    all_ok = tests_ok and bool(required) and all(s["status"] == "ok" for s in required) \
        and {s["step"] for s in required} == set(args.required)
    logs = {}
    for s in steps:
        if s["status"] != "ok":
            p = os.path.join(args.work, f"{s['step']}.log")
            if os.path.isfile(p):
                with open(p, errors="replace") as f:
                    logs[s["step"]] = f.read()[-4000:]
    payload = {"summary": {"all_ok": all_ok, "cuda_tests_passed": tests_ok, "opt_in_env": f"{CUDA_OPT_IN_ENV}=1"},
               "env": env, "steps": steps, "tests": tests, "layers": layers, "decode": decode,
               "decode_reference_path": decode_ref, "failed_step_logs": logs, "total_s": args.total_s}
    md = [f"# GPU check ({time.strftime('%Y-%m-%d', time.gmtime())})\n\n"]
    md.append(f"**{'All steps passed' if all_ok else 'NOT all steps passed'}**; CUDA tests "
              f"{'passed' if tests_ok else 'did not pass'} (with {CUDA_OPT_IN_ENV}=1). "
              f"Written by `bash scripts/gpu_check.sh` in {args.total_s}s.\n\n")
    if "error" not in env:
        md.append(md_env(env))
    dinfo = env.get("device") or {}
    if dinfo:
        md.append(f"- GPU: {dinfo.get('name')} (sm {dinfo.get('capability')}, {dinfo.get('memory_gib')} GiB, "
                  f"L2 {dinfo.get('l2_cache_mib')} MiB), torch CUDA {dinfo.get('torch_cuda')}\n")
    if args.nvidia_smi:
        md.append(f"- nvidia-smi: {args.nvidia_smi}\n")
    if args.nvcc:
        md.append(f"- nvcc: {args.nvcc}\n")
    md.append("\n## Steps\n\n| step | status | seconds | limit s | note |\n|---|---|---:|---:|---|\n")
    md.extend(f"| {s['step']} | {s['status']} | {s['seconds']} | {s['limit_s']} | {s['note']} |\n" for s in steps)
    if tests:
        md.append("\n## CUDA tests\n\n")
        if "unreadable" in tests:
            md.append(f"junit XML unreadable: {tests['unreadable']}\n")
        else:
            md.append(f"{tests['passed']} passed, {tests['failures']} failed, {tests['errors']} errors, "
                      f"{tests['skipped']} skipped in {tests['seconds']:.0f}s.\n")
            md.extend(f"- FAILED {f['test']}: {f['message'][:200]}\n" for f in tests["failed"])
            md.extend(f"- skipped ({n}): {r}\n" for r, n in tests["skip_reasons"].items())
    if layers and "results" in layers:
        bw = layers["copy_bandwidth"]
        cold_note = ("Cold: every call reads another copy of the weight (the copies exceed 2x L2)."
                     if any(r.get("lc_copies", 1) > 1 for r in layers["results"]) else
                     "One copy of each weight (L2-resident when it fits).")
        md.append(f"\n## Per-layer kernels{' (partial: the step was cut short)' if layers.get('partial') else ''}"
                  f"\n\nDevice-to-device copy: **{bw['gbps']:.1f} GB/s** ({bw['counted']}, "
                  f"{bw['buffer_bytes'] / 2**20:.0f} MiB). LC = the whole layer through `torch.ops.lcqat.lc_linear`; "
                  "GB/s = weight bytes read per call / time (LC: 2-bit codes + fp32 A, beta, s_u, s_v; dense: "
                  f"the weight in the activation dtype); % copy = that over the copy bandwidth; x = dense time / LC "
                  f"time. {cold_note} "
                  "rel err: LC output against the float64 reference oracle.\n\n"
                  "| layer | dtype | batch | LC us | LC GB/s | % copy | dense us | dense GB/s | % copy | x | rel err |\n"
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
        for r in layers["results"]:
            if not r.get("check"):
                md.append(f"| {r['layer']} | {r['dtype']} | {r['batch']} | FAILED: {r.get('error', '')} |" + " |" * 7 + "\n")
                continue
            md.append(f"| {r['layer']} | {r['dtype']} | {r['batch']} | {r['lc']['us']:.1f} | {r['lc']['gbps']:.1f} | "
                      f"{r['lc']['pct_of_copy_bw']:.1f} | {r['dense']['us']:.1f} | {r['dense']['gbps']:.1f} | "
                      f"{r['dense']['pct_of_copy_bw']:.1f} | {r['speedup_vs_dense']:.2f} | {r['rel_err']:.1e} |\n")
    for title, d in (("Decode", decode), ("Decode, LC layers on the reference path (no opt-in)", decode_ref)):
        if d and "results" in d:
            md.append(f"\n## {title}{' (partial: the step was cut short)' if d.get('partial') else ''}\n\n"
                      f"{d['model']}, batch 1, {d['args']['new_tokens']} new tokens, median of "
                      f"{d['args']['rounds']} rounds; LC layers: {d['lc_layers_path']}; LC model {d['lc_quantization']}.\n\n"
                      "| variant | tok/s | x bf16 |\n|---|---:|---:|\n")
            for v, r in d["results"].items():
                x = f"{r['x_bf16']:.2f}" if r.get("x_bf16") else ""
                md.append(f"| {v} | {r['tok_s']:.1f} | {x} |\n")
    if logs:
        md.append("\n## Logs of the steps that did not pass (tails)\n\n")
        md.extend(f"### {k}\n\n```\n{v[-2000:]}\n```\n\n" for k, v in logs.items())
    write_atomic(args.out_prefix + ".json", json.dumps(payload, indent=1))
    write_atomic(args.out_prefix + ".md", "".join(md))
    print("wrote", args.out_prefix + ".json", args.out_prefix + ".md")
    print("GPU check:", "all steps passed" if all_ok else "NOT all steps passed",
          "| CUDA tests:", "passed" if tests_ok else "did not pass")
    return 0 if all_ok else 1


# ------------------------------------------------------------------ CLI
def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p):
        p.add_argument("--device", default="cuda", help="cuda (default), or cpu for a dry run of the script")
        p.add_argument("--require-cuda", action="store_true",
                       help=f"exit {EXIT_NO_CUDA} instead of 0 when no CUDA device / CUDA kernels are available")
        p.add_argument("--threads", type=int, default=1, help="torch CPU threads (Timer num_threads)")

    p = sub.add_parser("layers", help="per-layer kernel benchmark")
    common(p)
    p.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    p.add_argument("--only", nargs="+", default=None, metavar="TEXT", help="only the layers whose name contains TEXT")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp16", "fp32"], choices=list(DTYPES))
    p.add_argument("--block", default=128, type=lambda s: s if s == "full" else int(s),
                   help="hadamard_block_size of the layers (a power of two or 'full')")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min-run-time", type=float, default=0.1, help="seconds per Timer.blocked_autorange")
    p.add_argument("--warm", action="store_true", help="reuse one weight copy (L2-resident when it fits)")
    p.add_argument("--out", default=os.path.join(RESULTS, "kernels_cuda.json"))
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser("decode", help="short greedy decode benchmark")
    common(p)
    p.add_argument("--variants", nargs="+", default=["bf16", "lcqat_fp32", "lcqat_bf16"],
                   choices=["fp32", "bf16", "lcqat_fp32", "lcqat_bf16"])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--random-weights", action="store_true", help="a random model of SmolLM2's shape")
    p.add_argument("--init-iters", type=int, default=1,
                   help="LCQATConfig.init_iters of the in-flight quantization (decode speed does not depend on it)")
    p.add_argument("--out", default=os.path.join(RESULTS, "decode_cuda.json"))
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser("report", help="merge scripts/gpu_check.sh's outputs into one result file")
    p.add_argument("--work", required=True, help="gpu_check.sh's work directory")
    p.add_argument("--out-prefix", required=True, help="writes <prefix>.json and <prefix>.md")
    p.add_argument("--required", nargs="+", default=["build", "tests", "layers", "decode"])
    p.add_argument("--total-s", type=int, default=0)
    p.add_argument("--nvidia-smi", default="")
    p.add_argument("--nvcc", default="")
    p.set_defaults(func=cmd_report)
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
