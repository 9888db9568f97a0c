"""`sftkit demo`: SFT's story told offline on a small model of our own.

A base model pre-trained on encyclopedic text and lists of questions, asked "What's the capital
of France?", continues with more questions; after SFT on chat conversations it answers — also
about held-out countries whose facts it only saw in pre-training.

    world.py      the facts: 175 countries, and the trained / held-out split
    phrasing.py   fact sentences, questions and answers in words
    everyday.py   numbers, days, colours: text and instructions that are not about countries
    corpus.py     the pre-training documents
    chats.py      the SFT conversations and the held-out questions
    dataset.py    writes all of it to demo/data/
    base.py       the tokenizer and the random Llama that demo/build_base.py pre-trains
"""
