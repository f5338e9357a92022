"""One exception type per kind of bad input. Each message names the offending thing and the fix."""


class InterpError(Exception):
    """Base class: the CLI turns these into one line on stderr and exit code 2."""


class IncompatibleModels(InterpError):
    """Base and tuned differ in architecture, sizes or tokenizer."""


class ModelNotFound(InterpError):
    """A model path, hub id or zoo name that cannot be resolved."""


class ZooModelNotBuilt(ModelNotFound):
    """A known zoo name whose folder has not been built yet."""


class CorruptWeights(InterpError):
    """A weights file that exists but cannot be read."""


class BadPrompts(InterpError):
    """An empty, unreadable or malformed prompt file or prompt set."""


class PromptTooLong(BadPrompts):
    """A prompt with more tokens than the model's context."""


class UnknownSite(InterpError):
    """A site name, layer or head that does not exist in this model."""


class UnsupportedEdit(InterpError):
    """An edit that the chosen site or backend cannot apply."""


class MissingExtra(InterpError):
    """A feature that needs an optional dependency group (pip extra) that is not installed."""


class ResultNotFound(InterpError):
    """A folder that should hold a saved analysis result but does not."""


class UnsupportedAdapter(InterpError):
    """An adapter folder that is not a plain LoRA adapter readable as weight deltas."""


class BadOption(InterpError, ValueError):
    """An option or argument outside its range or not one of its choices (also a ValueError)."""


class BadPositions(InterpError, IndexError):
    """Positions that fall outside some prompts (also an IndexError)."""


class BadModelArgument(InterpError, TypeError):
    """Models passed in a combination an analysis cannot take (also a TypeError)."""


class OverMemoryBudget(InterpError, MemoryError):
    """A capture larger than the memory budget with nowhere to stream it (also a MemoryError)."""


class NonFiniteValues(InterpError):
    """A NaN or inf in weights, activations or results, named where it first appears."""


class UnsupportedArchitecture(InterpError):
    """A model family interp does not support (not listed in interp.backends.architectures), named with the fix."""
