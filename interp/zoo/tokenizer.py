"""The zoo tokenizer: one token per whitespace-separated word, a `<bos>` prepended to every text.

Vocabulary: `<pad> <bos> <eos> <unk>` then the task words of `interp.zoo.tasks.WORDS`.
Special tokens written in a text (e.g. `"add 1 2 = 3 <eos> add 4 4 ="`) are parsed as themselves.
"""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from interp.zoo.tasks import WORDS

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
VOCAB = (PAD, BOS, EOS, UNK, *WORDS)


def build_tokenizer(max_length: int) -> PreTrainedTokenizerFast:
    """A right-padding word-level tokenizer over `VOCAB` for a model with `max_length` positions."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, VOCAB.index(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        padding_side="right", model_max_length=max_length,
    )
