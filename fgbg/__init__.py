"""fgbg: foreground/background separation by concept distillation from diffusion models."""
import logging as _logging

__version__ = "0.1.0"

# Notices of the libraries that are about their own internals, not the course, and that
# a notebook would show in red in its first cells. Dropped by exact text on the one logger
# that emits each (the standard logging registry: transformers and diffusers need not be
# imported here); everything else those loggers say still shows.
_LIBRARY_NOTICES = {
    # `from diffusers import StableDiffusionPipeline` imports transformers' CLIPImageProcessor
    # (and, through diffusers.loaders.ip_adapter, SiglipImageProcessor); without torchvision
    # (deliberately absent, see pyproject.toml) transformers >= 5 falls back to the PIL
    # processor and says so. The course never uses an image processor.
    "transformers.utils.import_utils": ("requires torchvision (not installed); falling back to",),
    # diffusers' ModelMixin.to() with a dtype warns whenever a model's _keep_in_fp32_modules
    # is not None, and it tests `[] is not None`: UNet2DConditionModel keeps no module in
    # float32, and the message then ends with ": []" (untrained_copy, fine-tuning's casts).
    "diffusers.models.modeling_utils": ("that should be kept in float32: []",),
}


class _DropNotices(_logging.Filter):
    fgbg_notices = True  # one filter per logger, also when fgbg is imported afresh (the Colab cell)

    def __init__(self, fragments):
        super().__init__()
        self.fragments = tuple(fragments)

    def filter(self, record):
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


def _drop_library_notices() -> None:
    for name, fragments in _LIBRARY_NOTICES.items():
        logger = _logging.getLogger(name)
        if not any(getattr(f, "fgbg_notices", False) for f in logger.filters):
            logger.addFilter(_DropNotices(fragments))


_drop_library_notices()
