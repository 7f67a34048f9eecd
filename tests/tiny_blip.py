"""A saved random-init BLIP captioner folder, as a user's pretrained one would be laid out."""

import torch
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessor,
    BlipProcessor,
)


def tiny_blip_folder(path, first_token=""):
    """A random-init BLIP with a word-level BERT tokenizer and its processor, saved as a real
    BLIP folder is (`save_pretrained` of the model and of a `BlipProcessor`). The decoder's
    special tokens are turned off, so it always emits words; `first_token="[SEP]"` instead makes
    it stop at once (empty captions)."""
    words = "a an the red blue green circle square star on at top left right of picture".split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizer.from_pretrained(str(path))  # transformers 5 ignores vocab_file=
    text = dict(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        encoder_hidden_size=32,
        max_position_embeddings=32,
        bos_token_id=tok.cls_token_id,
        sep_token_id=tok.sep_token_id,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.sep_token_id,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision))
    with torch.no_grad():  # larger random weights: captions then depend on the image
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.3)
        bias = model.text_decoder.cls.predictions.bias  # (V,)
        bias[:5] = -1e4
        if first_token:
            bias[tok.convert_tokens_to_ids(first_token)] = 1e4
    model.save_pretrained(path)
    image_processor = BlipImageProcessor(  # not CLIP's normalisation: Captioner must read it
        size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    BlipProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(path)
    return path
