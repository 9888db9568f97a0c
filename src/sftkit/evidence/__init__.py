"""Instruments that show what fine-tuning did to a model, for any run.

    sftkit diff BASE TUNED                       # diff.py: per-layer relative weight change, table + PNG
    sftkit compare BASE TUNED --prompts FILE     # compare.py: greedy replies of both, side by side
    sftkit train RECIPE eval.reference_data=ref.txt train.keep_best=true train.early_stopping_patience=2
                                                 # monitor.py: forgetting and overfitting, while training
"""
