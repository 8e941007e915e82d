"""Supervised fine-tuning's mathematics: the completion-only next-token loss of one batch
(:func:`raypo.sft.step.sft_step`), pure torch like :mod:`raypo.step`.

``raypo sft`` runs it on ``raypo train``'s driver and Ray Train + DeepSpeed worker loop
(:mod:`raypo.train.sft`); its ``final/`` is a Hugging Face model with its tokenizer, ready as
``raypo train``'s ``model.name_or_path``.
"""
