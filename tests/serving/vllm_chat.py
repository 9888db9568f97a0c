"""Greedy chat replies from vLLM's offline engine: run by tests/test_serving.py inside vLLM's own venv.

    VENV/bin/python tests/serving/vllm_chat.py MODEL_DIR PROMPTS.json OUT.json [MAX_NEW_TOKENS]

PROMPTS.json is a list of message lists; OUT.json gets, per prompt, the generated token ids, the text,
vLLM's finish_reason and the token it stopped at. It imports vLLM only (never sftkit: that venv pins
another transformers), and vLLM reads the directory as any user's `vllm serve MODEL_DIR` would: its
chat template, and its generation_config.json for the stop tokens.
"""

import json
import sys
import time

from vllm import LLM, SamplingParams


def main() -> None:
    model_dir, prompts_file, out_file = sys.argv[1:4]
    max_tokens = int(sys.argv[4]) if len(sys.argv) > 4 else 32
    with open(prompts_file) as f:
        prompts = json.load(f)
    started = time.perf_counter()
    llm = LLM(model=model_dir, dtype="float32", max_model_len=512, seed=0, enforce_eager=True)
    loaded = time.perf_counter()
    outputs = llm.chat(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
    done = time.perf_counter()
    replies = [{"ids": list(o.outputs[0].token_ids), "text": o.outputs[0].text,
                "finish_reason": o.outputs[0].finish_reason, "stop_reason": o.outputs[0].stop_reason,
                "prompt_ids": list(o.prompt_token_ids)} for o in outputs]
    with open(out_file, "w") as f:
        json.dump({"replies": replies, "load_s": loaded - started, "generate_s": done - loaded,
                   "vllm": __import__("vllm").__version__}, f)


if __name__ == "__main__":
    main()
