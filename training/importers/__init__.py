"""`simmim import`: serve and fine-tune SimMIM models that already exist.

An official microsoft/SimMIM checkpoint (official.py), a Hugging Face save_pretrained folder of
ViTForMaskedImageModeling / SwinForMaskedImageModeling (hf.py) or a timm checkpoint
(timm_format.py) becomes a run folder that `simmim export`, `simmim evaluate --checkpoint` and
`simmim finetune` read like a pretrained run (run.py). Nothing is downloaded.
"""
