"""``raypo sft``: supervised fine-tuning with the completion-only next-token loss.

The same data pipeline, driver and Ray Train + DeepSpeed worker loop as ``raypo train``
(:mod:`raypo.train.run`); only the step differs: :func:`raypo.sft.step.sft_step` (the loss of
one batch), run by the workers through :func:`raypo.sft.loop.sft_micro_step`. Its ``final/``
is a Hugging Face model with its tokenizer, ready as ``raypo train``'s ``model.name_or_path``.
"""
