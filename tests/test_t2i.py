"""The tiny text-to-image pipeline (critic_align/assets/tiny_t2i): its training script's pieces."""

from __future__ import annotations

import numpy as np

from critic_align.tasks.composition import is_held_out, parse_prompt, vocabulary_words


def test_written_tokenizer_keeps_every_grammar_word_whole(tmp_path):
    from transformers import CLIPTokenizer

    from train.train_t2i import MAX_TOKENS, write_tokenizer

    tok = write_tokenizer(tmp_path / "tok")
    again = CLIPTokenizer.from_pretrained(tmp_path / "tok")  # what the pipeline loads
    for t in (tok, again):
        for w in vocabulary_words():
            assert len(t(w, add_special_tokens=False).input_ids) == 1, w
        ids = t("a red 3 left of a blue 7").input_ids
        assert len(ids) == 10 and t.convert_ids_to_tokens(ids)[1:4] == ["a</w>", "red</w>", "3</w>"]
        assert t.convert_ids_to_tokens(t("two red 3s").input_ids)[3:5] == ["3</w>", "s</w>"]
        assert t.model_max_length == MAX_TOKENS
    # any other text still tokenizes (byte characters), without an unknown token
    assert tok.unk_token_id not in tok("a purple cat!").input_ids[1:-1]  # (CLIP's unk is its end token)


def test_composition_sampler_never_draws_held_out_prompts():
    from train.train_t2i import CompositionSampler

    s = CompositionSampler(seed=0)
    images, prompts = s.batch(400)
    assert images.shape == (400, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    comps = [parse_prompt(p) for p in prompts]
    assert not any(is_held_out(c) for c in comps)
    relations = np.mean([c.relation is not None for c in comps])
    assert 0.4 < relations < 0.6  # half count prompts, half relation prompts
