"""What a model does and what fine-tuning changed, for any run.

    sftkit train RECIPE train.eval_every=50       # perplexity.py: eval loss on the held-out split
    sftkit train RECIPE eval.reference_data=ref.txt train.keep_best=true train.early_stopping_patience=2
                                                 # monitor.py: forgetting and overfitting, while training
    sftkit diff BASE TUNED                       # diff.py: per-layer relative weight change, table + PNG
    sftkit compare BASE TUNED --prompts FILE     # compare.py: greedy replies of both, side by side
    sftkit eval --model DIR --tasks FILE [--base DIR] [--few-shot K]
                                                 # tasks.py (read, judge) + task_eval.py (ask, score): accuracy
    sftkit train RECIPE eval.tasks=FILE          # ... the same scoring at every eval (monitor.py)
    sftkit eval --model DIR --lm-eval TASKS      # lm_eval_run.py: lm-evaluation-harness, offline
"""
