"""The SpectralKD recipe as a library: its options and parser (:mod:`.arguments`, :func:`load_recipe`), config files
(:mod:`.config_files`), the run top to bottom (:mod:`.run`) and what it reports (:mod:`.report`)."""

from .arguments import ARGUMENT_CLASSES, ModelArguments, load_recipe, parse_arguments

__all__ = ["ARGUMENT_CLASSES", "ModelArguments", "load_recipe", "parse_arguments"]
