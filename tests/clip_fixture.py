"""A tiny random transformers CLIPModel folder (config, weights, tokenizer, image processor): the `clip_folder`
fixture of the evaluation and training tests (registered in conftest.py)."""

import pytest
from reference_models import randomize_

from ipadapter_jax.tiny_models import write_tiny_tokenizer

TEXT = dict(vocab_size=518, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, bos_token_id=516, eos_token_id=517, pad_token_id=517)
VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
              num_attention_heads=4)


@pytest.fixture(scope="session")
def clip_folder(tmp_path_factory, torch):
    """(folder, the transformers model it holds)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = tmp_path_factory.mktemp("clip")
    ref = randomize_(CLIPModel(CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=24)), seed=5)
    with torch.no_grad():  # random final-norm biases give every embedding one shared direction: all cosines
        ref.vision_model.post_layernorm.bias.zero_()  # would then have one sign
        ref.text_model.final_layer_norm.bias.zero_()
    ref.eval().save_pretrained(folder)
    tokenizer = CLIPTokenizer.from_pretrained(str(write_tiny_tokenizer(folder / "tok")))
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder, ref
