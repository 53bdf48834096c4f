"""Runs inside the vLLM venv (scripts/setup_vllm.sh), started by tests/test_vllm.py.

    python vllm_child.py '{"model": DIR, "prompts": [[ids...], ...], "max_tokens": 32, "tp": 1}'
    python vllm_child.py '{"runs": [{"model": DIR, ...}, ...]}'

Greedy-decodes each prompt (token ids) with ``vllm.LLM`` and prints one JSON line: the new
token ids and each chosen token's logprob. With ``runs``, one model after another in this one
process (one import of vLLM), each run's result or the error that stopped it, as a list. vLLM's
engine may run in a spawned process, so the engine is created under ``if __name__ == "__main__"``.
"""

import json
import sys
import time


def serve_one(args: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=args["model"], dtype=args.get("dtype", "float32"), tensor_parallel_size=args.get("tp", 1),
              enforce_eager=args.get("enforce_eager", True), max_model_len=args.get("max_model_len", 512),
              seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=args["max_tokens"], logprobs=0, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in args["prompts"]], params)
    seconds = time.perf_counter() - t0
    result = []
    for o in outs:
        c = o.outputs[0]
        lps = [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)] if c.logprobs else []
        result.append({"tokens": list(c.token_ids), "logprobs": lps})
    quant = llm.llm_engine.vllm_config.model_config.quantization
    return {"outputs": result, "quantization": quant, "generate_seconds": seconds}


def main() -> None:
    args = json.loads(sys.argv[1])
    if "runs" not in args:
        print("RESULT " + json.dumps(serve_one(args)), flush=True)
        return
    import gc
    import traceback

    results = []
    for run in args["runs"]:
        try:
            results.append(serve_one(run))
        except Exception as exc:  # recorded for the test to check, then the next model
            results.append({"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]})
        gc.collect()
    print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
