"""Dataset tooling, off the training path: look at a dataset, then clean it.

    sftkit data inspect FILE --tokenizer DIR --report DIR     # inspect.py: counts, lengths, duplicates, offenders
    sftkit data clean FILE --out FILE --drop-refusals         # clean.py: the same rules, rows removed, same format
                                                              # dedupe.py: exact and near duplicates (MinHash LSH)
"""
