"""lm-evaluation-harness on a trained directory, offline: the numbers the community reports.

    pip install 'sftkit[eval]'                                   # lm_eval is an optional extra
    sftkit eval --model runs/sft/final --lm-eval tasks/gsm8k_local.yaml --limit 100
    sftkit eval --model runs/sft/final --lm-eval arc_easy,hellaswag   # named tasks: their data must be cached

The harness's own HF backend loads `--model` (a local directory; HF_HUB_OFFLINE and HF_DATASETS_OFFLINE
are set, so nothing is downloaded). A task given as a YAML file is registered from its folder, so a
task over local files works without the network, e.g. a `generate_until` task with
`dataset_path: json` and `dataset_kwargs: {data_files: {test: /path/gsm8k_test.jsonl}}`. A model with a
chat template is asked through it (`apply_chat_template`), as `sftkit eval` asks it; `--few-shot K`
becomes the harness's `num_fewshot` (as earlier turns with a template: `fewshot_as_multiturn`).

Prints the harness's table and writes its results as `OUT/lm_eval_results.json` (default
runs/eval/lm-eval/).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from sftkit.model import ModelError, check_local_dir, load_tokenizer, resolve_device


def require_lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise ModelError("--lm-eval needs lm-evaluation-harness, an optional extra: pip install 'sftkit[eval]' "
                         "(or pip install lm_eval)") from None
    return lm_eval


def task_names(spec: str) -> tuple[list[str], list[str]]:
    """`a,b,path/task.yaml` -> (task names, folders to register): a YAML file's name is its `task:` field."""
    names, folders = [], []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        path = Path(item)
        if path.suffix in (".yaml", ".yml"):
            if not path.is_file():
                raise FileNotFoundError(f"--lm-eval: {path} is not a file")
            loaded = yaml.safe_load(path.read_text()) or {}  # plain YAML; harness tags (!function) are not used here
            if not isinstance(loaded, dict) or not loaded.get("task"):
                raise ModelError(f"--lm-eval: {path} has no `task:` name — is it an lm-evaluation-harness task?")
            names.append(str(loaded["task"]))
            folders.append(str(path.parent.resolve()))
        else:
            names.append(item)
    if not names:
        raise ModelError("--lm-eval: no task named (a comma-separated list of task names or YAML files)")
    return names, list(dict.fromkeys(folders))


def run_lm_eval(model_dir: str | Path, tasks: str, *, few_shot: int | None = None, limit: int | None = None,
                out: str | Path | None = None, batch_size: int = 32, device: str = "auto",
                max_new_tokens: int | None = None) -> dict[str, Any]:
    """Run the harness on `model_dir`; print its table; return its results dict."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    directory = check_local_dir(model_dir, "--model")
    lm_eval = require_lm_eval()
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    names, folders = task_names(tasks)
    chat = bool(load_tokenizer(directory).chat_template)
    manager = TaskManager(include_path=folders or None)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise ModelError(f"--lm-eval: unknown task {unknown[0]!r} — give a task YAML file (a local task), or a name "
                         "lm-evaluation-harness knows (`lm_eval ls tasks`)")
    results = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(directory), "dtype": "float32" if str(resolve_device(device)) ==
                                "cpu" else "auto"},
        tasks=names, num_fewshot=few_shot, limit=limit, batch_size=batch_size, device=str(resolve_device(device)),
        apply_chat_template=chat, fewshot_as_multiturn=chat and bool(few_shot), task_manager=manager,
        gen_kwargs=None if max_new_tokens is None else f"max_gen_toks={max_new_tokens}", log_samples=True,
        random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
    )
    print(make_table(results))
    out = Path(out) if out is not None else Path("runs") / "eval" / "lm-eval"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "lm_eval_results.json"
    path.write_text(json.dumps({k: results[k] for k in ("results", "configs", "n-samples", "samples") if k in results},
                               indent=1, default=str))
    print(f"lm-eval results {path} (chat template: {'yes' if chat else 'no'})")
    return results
