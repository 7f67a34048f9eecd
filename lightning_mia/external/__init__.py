"""Audit a model trained elsewhere: a diffusers StableDiffusionPipeline folder (fully
fine-tuned, or a base plus a LoRA adapter) and the lists of pairs it was and was not trained on.

    python attack.py --pipeline /models/sd-v1-5 --lora my_lora/ --members members.jsonl \
        --non-members non_members.jsonl --experiment runs/audit

`audit.prepare_external` turns them into an experiment folder like any other (splits.json with
the lists as row 0, a target checkpoint, shadows fine-tuned the same way from the same base);
`splits` draws the rows, `target` writes the checkpoint.
"""
