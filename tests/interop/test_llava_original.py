"""Original LLaVA checkpoints (haotian-liu/LLaVA layout) open as vlbridge models with the original code's
prompt ids and pixels, and transformers' LLaVA's logits and answers on the same weights."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessorPil,
    LlavaProcessor,
)

from vlbridge.errors import ConfigError
from vlbridge.interop import llava_original
from vlbridge.testing import _TEXTS, TINY_LLM_CONFIGS, TINY_TOWER_CONFIGS
from vlbridge.tokenization import train_bpe

WIDE = Image.new("RGB", (48, 30), (220, 40, 40))
WIDE.paste((30, 30, 200), (10, 5, 30, 25))
TALL = Image.new("RGB", (20, 44), (20, 160, 60))
TALL.paste((250, 250, 0), (4, 10, 16, 30))
SYSTEM = llava_original.SYSTEMS["vicuna_v1"]  # the default: LLaVA-1.5's training and eval prompt
IMAGE_TOKEN_INDEX = -200  # llava/constants.py


def llama_tokenizer() -> LlamaTokenizer:
    """A tiny sentencepiece-style BPE (Metaspace "▁", byte fallback, BOS) in transformers' Llama class, as
    transformers 5 opens liuhaotian/llava-v1.5-7b's tokenizer; no `<image>` token (the original has none)."""
    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    backend.train_from_iterator([*_TEXTS, SYSTEM, "USER: ASSISTANT:"] * 10, trainer)
    model = json.loads(backend.to_str())["model"]
    vocab = dict(model["vocab"])
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)


def bpe_tokenizer():
    return train_bpe(_TEXTS * 10, 300)


def randomize(module: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():  # larger than the default init, so that logits differ clearly between tokens
        for param in module.parameters():
            if param.dim() > 1:
                param.normal_(0, 0.08)
            else:
                param.normal_(0, 0.02)
    return module.eval()


def tiny_tower(seed: int) -> CLIPVisionModel:
    return randomize(CLIPVisionModel(CLIPVisionConfig(**TINY_TOWER_CONFIGS["clip_vision_model"])), seed)


def write_original(
    root,
    family: str = "llama",
    tokenizer=None,
    *,
    projector: str = "mlp2x_gelu",
    aspect: str | None = "pad",
    select_feature: str = "patch",
    select_layer: int = -2,
    tower_in_checkpoint: bool = False,
    weights: str = "safetensors",
    full_clip: bool = False,
    **overrides,
):
    """A tiny checkpoint as haotian-liu/LLaVA saves it, and the CLIP checkpoint its mm_vision_tower names.

    Returns (checkpoint dir, the LLM, the projector, the tower the checkpoint runs with)."""
    tokenizer = tokenizer or llama_tokenizer()
    tower_dir, path = root / "clip-vit", root / "llava-v1.5-tiny"
    if full_clip:  # like openai/clip-vit-large-patch14-336: a whole CLIPModel, text half included
        clip = CLIPModel(
            CLIPConfig(
                vision_config=TINY_TOWER_CONFIGS["clip_vision_model"],
                text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1},
                projection_dim=16,
            )
        )
        clip.vision_model.load_state_dict(tiny_tower(1).state_dict())
        clip.save_pretrained(tower_dir)
    else:
        tiny_tower(1).save_pretrained(tower_dir)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tower_dir
    )
    text = AutoConfig.for_model(family, **TINY_LLM_CONFIGS[family], vocab_size=len(tokenizer))
    for name in ("bos", "eos", "pad"):
        setattr(text, f"{name}_token_id", getattr(tokenizer, f"{name}_token_id"))
    llm = randomize(AutoModelForCausalLM.from_config(text), 2)
    width, mm_hidden = text.hidden_size, TINY_TOWER_CONFIGS["clip_vision_model"]["hidden_size"]
    if projector == "linear":
        proj = nn.Linear(mm_hidden, width)
    elif projector == "mlp2x_gelu":
        proj = nn.Sequential(nn.Linear(mm_hidden, width), nn.GELU(), nn.Linear(width, width))
    else:  # what the original builder makes of mlp1x_gelu: one Linear in a Sequential
        proj = nn.Sequential(nn.Linear(mm_hidden, width))
    randomize(proj, 3)
    state = {k: v.clone() for k, v in llm.state_dict().items()}  # model.* and lm_head.*
    state.update({f"model.mm_projector.{k}": v.clone() for k, v in proj.state_dict().items()})
    tower = tiny_tower(1)
    if tower_in_checkpoint:  # trained with unfreeze_mm_vision_tower: these weights, not the CLIP dir's
        tower = tiny_tower(4)
        prefix = "model.vision_tower.vision_tower.vision_model."  # CLIPVisionModel's keys in transformers 4
        state.update({prefix + k: v.clone() for k, v in tower.state_dict().items()})
    path.mkdir()
    if weights == "safetensors":
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(state, path / "pytorch_model.bin")
    tokenizer.save_pretrained(path)
    config = text.to_dict()
    rope = config.pop("rope_parameters", None) or {}
    config.update(
        {  # as transformers 4.3x wrote LLaVA-1.5's config.json
            "architectures": [f"Llava{family.capitalize()}ForCausalLM"],
            "model_type": f"llava_{family}",
            "rope_theta": rope.get("rope_theta", 10000.0),
            "rope_scaling": None,
            "torch_dtype": "float32",
            "freeze_mm_mlp_adapter": False,
            "image_aspect_ratio": aspect,
            "mm_hidden_size": mm_hidden,
            "mm_patch_merge_type": "flat",
            "mm_projector_lr": None,
            "mm_projector_type": projector,
            "mm_use_im_patch_token": False,
            "mm_use_im_start_end": False,
            "mm_vision_select_feature": select_feature,
            "mm_vision_select_layer": select_layer,
            "mm_vision_tower": str(tower_dir),
            "tokenizer_model_max_length": 2048,
            "tokenizer_padding_side": "right",
            "tune_mm_mlp_adapter": False,
            "unfreeze_mm_vision_tower": tower_in_checkpoint,
            "use_mm_proj": True,
            **overrides,
        }
    )
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path, llm, proj, tower


def transformers_reference(
    path, llm, proj, tower, tokenizer, *, projector, select_feature, select_layer, pad
):
    """transformers' LlavaForConditionalGeneration on the same weights, mapped as its conversion script maps
    them (model. -> model.language_model., mm_projector.0/.2 -> linear_1/2, tower from the CLIP dir), and its
    LlavaProcessor; the vocabulary grows by `<image>` (those rows are never compared or generated)."""
    text = llm.config
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    text_config = AutoConfig.for_model(text.model_type, **TINY_LLM_CONFIGS[text.model_type])
    text_config.vocab_size = image_id + 1
    for name in ("bos", "eos", "pad"):
        setattr(text_config, f"{name}_token_id", getattr(text, f"{name}_token_id"))
    strategy = "default" if select_feature == "patch" else "full"
    config = LlavaConfig(
        vision_config=tower.config,
        text_config=text_config,
        image_token_id=image_id,
        vision_feature_layer=select_layer,
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu" if projector == "mlp2x_gelu" else "linear",
        multimodal_projector_bias=True,
    )
    hf = LlavaForConditionalGeneration(config).eval()
    vocab = text.vocab_size
    with torch.no_grad():
        own = {k: v for k, v in llm.model.state_dict().items() if k != "embed_tokens.weight"}
        hf.model.language_model.load_state_dict(own, strict=False)
        hf.model.language_model.embed_tokens.weight[:vocab] = llm.model.embed_tokens.weight
        hf.lm_head.weight[:vocab] = llm.lm_head.weight
        hf.model.vision_tower.load_state_dict(tower.state_dict())
        projection = hf.model.multi_modal_projector
        if projector == "mlp2x_gelu":
            projection.linear_1.load_state_dict(proj[0].state_dict())
            projection.linear_2.load_state_dict(proj[2].state_dict())
        else:  # one Linear: transformers' projector with an identity second layer and no activation
            projection.linear_1.load_state_dict((proj if projector == "linear" else proj[0]).state_dict())
            projection.linear_2.weight.copy_(torch.eye(text.hidden_size))
            projection.linear_2.bias.zero_()
    if pad:
        images = LlavaImageProcessorPil(
            do_pad=True, size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        )
    else:
        images = CLIPImageProcessorPil.from_pretrained(
            json.loads((path / "config.json").read_text())["mm_vision_tower"]
        )
    processor = LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1,
    )
    return hf, processor


def original_input_ids(path, prompt: str, image_tokens: int, image_id: int) -> list[int]:
    """llava/mm_utils.py tokenizer_image_token with the checkpoint's own tokenizer, untouched; the
    IMAGE_TOKEN_INDEX slot widened to the image's features (what prepare_inputs_labels_for_multimodal
    splices there), written as ours' `<image>` id for the comparison."""
    tokenizer = AutoTokenizer.from_pretrained(str(path), config=AutoConfig.for_model("llama"))
    prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]

    def insert_separator(x, sep):
        return [ele for sublist in zip(x, [sep] * len(x), strict=True) for ele in sublist][:-1]

    input_ids, offset = [], 0
    if prompt_chunks and prompt_chunks[0] and prompt_chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for x in insert_separator(prompt_chunks, [IMAGE_TOKEN_INDEX] * (offset + 1)):
        input_ids.extend(x[offset:])
    return [t for i in input_ids for t in ([image_id] * image_tokens if i == IMAGE_TOKEN_INDEX else [i])]


def original_pixels(path, image, pad: bool) -> torch.Tensor:
    """llava/mm_utils.py process_images: expand2square with the mean colour for 'pad', then CLIP's
    processor."""
    processor = CLIPImageProcessorPil.from_pretrained(
        json.loads((path / "config.json").read_text())["mm_vision_tower"]
    )
    if pad:
        width, height = image.size
        fill = tuple(int(x * 255) for x in processor.image_mean)
        if width != height:
            side = max(width, height)
            square = Image.new(image.mode, (side, side), fill)
            square.paste(image, ((side - width) // 2, (side - height) // 2))
            image = square
    return processor(image, return_tensors="pt")["pixel_values"]


def greedy(tokenizer, new_tokens: int = 8) -> dict:
    return {
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "do_sample": False,
        "suppress_tokens": [tokenizer.convert_tokens_to_ids("<image>")],
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


CASES = {
    # LLaVA-1.5: Llama, sentencepiece-style tokenizer, 2-layer GELU projector, padded to square, layer -2
    "llava-1.5": ("llama", llama_tokenizer, {}),
    "mistral-linear-cls": (
        "mistral",
        bpe_tokenizer,
        {
            "projector": "linear",
            "aspect": "square",
            "select_feature": "cls_patch",
            "select_layer": -1,
            "full_clip": True,
        },
    ),
    "bin-unfrozen-tower-mlp1x": (
        "llama",
        llama_tokenizer,
        {"projector": "mlp1x_gelu", "aspect": None, "tower_in_checkpoint": True, "weights": "bin"},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("image", [WIDE, TALL], ids=["wide", "tall"])
def test_import_reproduces_the_original_prompt_pixels_and_transformers_answers(tmp_path, case, image):
    family, make_tokenizer, options = CASES[case]
    path, llm, proj, tower = write_original(tmp_path, family, make_tokenizer(), **options)
    assert llava_original.detect(path)
    model, processor = llava_original.load(path)
    settings = {
        "projector": options.get("projector", "mlp2x_gelu"),
        "select_feature": options.get("select_feature", "patch"),
        "select_layer": options.get("select_layer", -2),
    }
    pad = options.get("aspect", "pad") == "pad"
    assert model.config.frontend.image.resize == ("pad" if pad else "crop")

    question = "What color is the circle?"
    messages = [{"role": "user", "content": processor.place_images(question, 1)}]
    prompt = processor.render(messages, add_generation_prompt=True)
    assert prompt == f"{SYSTEM} USER: <image>\n{question} ASSISTANT:"
    batch = processor([messages], [[image]])
    tokens_per_image = 16 + (settings["select_feature"] == "cls_patch")
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert batch["input_ids"][0].tolist() == original_input_ids(path, prompt, tokens_per_image, image_id)
    assert (batch["pixel_values"] - original_pixels(path, image, pad)).abs().max() < 1e-6

    hf, hf_processor = transformers_reference(
        path, llm, proj, tower, processor.tokenizer, pad=pad, **settings
    )
    want = hf_processor(images=[image], text=prompt, return_tensors="pt")
    assert torch.equal(batch["input_ids"], want["input_ids"])
    assert (batch["pixel_values"] - want["pixel_values"]).abs().max() < 1e-6
    vocab = llm.config.vocab_size
    with torch.no_grad():
        logits = model(**batch).logits
        want_logits = hf(**want).logits
        tokens = model.generate(**batch, **greedy(processor.tokenizer))[0]
        want_tokens = hf.generate(**want, **greedy(processor.tokenizer))[0, want["input_ids"].shape[1] :]
    assert (logits[..., :vocab] - want_logits[..., :vocab]).abs().max() < 1e-5
    assert torch.equal(tokens, want_tokens)


def test_the_template_renders_conversation_py_llava_v1_and_vicuna_v1(tmp_path):
    path, *_ = write_original(tmp_path)
    _, processor = llava_original.load(path)
    turns = [
        {"role": "user", "content": "<image>\nWhat is it?"},
        {"role": "assistant", "content": "A square."},
        {"role": "user", "content": "Which color?"},
    ]
    # Conversation(sep_style=TWO, sep=" ", sep2="</s>").get_prompt() with the reply slot left empty
    assert processor.render(turns, add_generation_prompt=True) == (
        f"{SYSTEM} USER: <image>\nWhat is it? ASSISTANT: A square.</s>USER: Which color? ASSISTANT:"
    )
    system = [{"role": "system", "content": "Answer briefly."}]
    assert processor.render(system + turns[:1], add_generation_prompt=True) == (
        "Answer briefly. USER: <image>\nWhat is it? ASSISTANT:"
    )
    _, llava_v1 = llava_original.load(path, conv_mode="llava_v1")
    assert llava_v1.render(turns[:1], add_generation_prompt=True).startswith(
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions. USER: "
    )


def test_the_tokenizer_keeps_the_original_split_after_a_save(tmp_path):
    """transformers' Llama tokenizer does not prefix "▁" after a special token; the import switches that on
    (what the original's piecewise tokenization does), and a saved copy reopens the same way."""
    path, *_ = write_original(tmp_path)
    _, processor = llava_original.load(path)
    prompt = f"{SYSTEM} USER: <image>\nWhat is it? ASSISTANT:"
    plain = AutoTokenizer.from_pretrained(str(path), config=AutoConfig.for_model("llama"))
    plain.add_special_tokens({"additional_special_tokens": ["<image>"]}, replace_extra_special_tokens=False)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    want = original_input_ids(path, prompt, 1, image_id)
    assert plain(prompt).input_ids != want  # the bare tokenizer loses the "▁" after <image>
    assert processor.tokenizer(prompt).input_ids == want
    assert image_id == len(plain) - 1
    processor.tokenizer.save_pretrained(tmp_path / "saved")
    assert AutoTokenizer.from_pretrained(str(tmp_path / "saved"))(prompt).input_ids == want


def test_detect_takes_original_configs_only(tmp_path):
    path, *_ = write_original(tmp_path)
    assert llava_original.detect(path)
    hf_layout = tmp_path / "hf"
    hf_layout.mkdir()
    (hf_layout / "config.json").write_text(json.dumps({"model_type": "llava", "text_config": {}}))
    assert not llava_original.detect(hf_layout)
    assert not llava_original.detect(tmp_path / "missing")
    v15 = tmp_path / "v1.5"  # liuhaotian/llava-v1.5-*: the model_type transformers' LLaVA also uses
    v15.mkdir()
    config = json.loads((path / "config.json").read_text())
    (v15 / "config.json").write_text(json.dumps({**config, "model_type": "llava"}))
    assert llava_original.detect(v15)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mm_use_im_start_end": True}, "mm_use_im_start_end=true"),
        ({"mm_projector_type": "mlp3x_gelu"}, "mm_projector_type='mlp3x_gelu'"),
        ({"mm_projector_type": "identity"}, "mm_projector_type='identity'"),
        ({"image_aspect_ratio": "anyres"}, "LLaVA-NeXT's tiling"),
        ({"mm_patch_merge_type": "spatial_unpad"}, "mm_patch_merge_type='spatial_unpad'"),
        ({"architectures": ["LlavaMptForCausalLM"], "model_type": "llava_mpt"}, "on a mpt LLM"),
    ],
)
def test_settings_vlbridge_cannot_reproduce_are_config_errors(tmp_path, overrides, message):
    path, *_ = write_original(tmp_path, tokenizer=bpe_tokenizer(), **overrides)
    with pytest.raises(ConfigError, match=message):
        llava_original.load(path)


def test_an_unreachable_vision_tower_is_a_config_error_that_names_the_override(tmp_path):
    path, *_ = write_original(tmp_path, tokenizer=bpe_tokenizer(), mm_vision_tower=str(tmp_path / "gone"))
    with pytest.raises(ConfigError, match="pass vision_tower="):
        llava_original.load(path)
    model, _ = llava_original.load(path, vision_tower=str(tmp_path / "clip-vit"))
    assert model.config.frontend.vision.feature_layer == -2


def test_a_bare_sentencepiece_tokenizer_without_its_converter_is_a_config_error(tmp_path):
    # sentencepiece is no vlbridge dependency (absent from every CI leg); with it, transformers would convert
    # tokenizer.model itself and this error path would not exist
    assert importlib.util.find_spec("sentencepiece") is None
    path, *_ = write_original(tmp_path, tokenizer=bpe_tokenizer())
    (path / "tokenizer.json").unlink()
    (path / "tokenizer.model").write_bytes(b"\x0a\x05hello")  # what liuhaotian/llava-v1.5-7b ships instead
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "LlamaTokenizer"}))
    with pytest.raises(ConfigError, match="pip install sentencepiece"):
        llava_original.load(path)


@pytest.mark.parametrize(
    "reducer",
    [{"type": "turbo"}, {"type": "fastv", "k": 1}, {"type": "pmod"}],
    ids=["turbo", "fastv", "pmod"],
)
def test_token_reducers_switch_on_for_an_imported_original_checkpoint(tmp_path, reducer):
    path, *_ = write_original(tmp_path)
    model, processor = llava_original.load(path, reducers=[reducer])
    assert [r.type for r in model.config.reducers] == [reducer["type"]]
    messages = [{"role": "user", "content": processor.place_images("What color?", 1)}]
    with torch.no_grad():
        tokens = model.generate(**processor([messages], [[WIDE]]), **greedy(processor.tokenizer, 4))
    assert tokens.shape[-1] == 4
