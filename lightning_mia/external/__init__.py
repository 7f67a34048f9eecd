"""Audit a model trained elsewhere: a diffusers pipeline folder — a StableDiffusionPipeline
(the diffusion family) or a StableDiffusion3Pipeline (the flow family), fully fine-tuned or a
base plus a LoRA adapter — and the lists of pairs it was and was not trained on.

    python attack.py --external.pipeline /models/sd-v1-5 --external.lora my_lora/ \
        --external.members members.jsonl --external.non_members non.jsonl --experiment runs/audit

`audit.prepare_external` turns them into an experiment folder like any other (splits.json with
the lists as row 0, a target checkpoint, shadows fine-tuned the same way from the same base);
`splits` draws the rows, `target` writes the checkpoint.
"""
