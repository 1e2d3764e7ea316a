"""Hugging Face <-> megatron conversion: one module per model family, a
registry from the HF ``architectures`` name to it, and checkpoint readers and
writers. Errors the user can fix raise ``ConversionError``."""

from megatron_dpo.config.errors import ConfigError


class ConversionError(ConfigError):
    """A checkpoint or config that cannot be converted; the message names the
    file or key and the fix. A ConfigError, so the CLI reports it as one when
    ``policy.model_name`` points at such a checkpoint."""
