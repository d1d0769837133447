"""The export stage: a merged model and the tokenizer it trained with, written in a format other
runtimes read (GGUF for llama.cpp and Ollama). `peftcli.commands.export` drives it.

    arch.py    one row per model architecture GGUF can hold: its GGUF name, hyperparameters,
               and how a tensor's layout differs from transformers'
    vocab.py   the tokenizer as GGUF metadata (tokens, types, merges, pre-tokenizer, special
               tokens, chat template)
    gguf.py    the file: tensors through gguf-py's writer and quantizers, written beside OUT
               and renamed into place
"""
