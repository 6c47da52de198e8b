"""The one error type of the models package.

A :class:`ModelConfigError` means a model or dataset cannot be built as asked: its message is one line that
names the config field (``model.overrides.patch``, ``data.path``, ...), the value and the fix. The models know
nothing of the framework, so the framework translates it into its own user error where it builds models from
a job config (:mod:`oobleck.model_building`).
"""


class ModelConfigError(ValueError):
    """A model shape, dataset or pretrained state that cannot be used; the message names the field and the fix."""
