"""User-facing errors: one sentence naming the problem and the fix, printed by the CLI without a traceback."""


class UserError(Exception):
    """Bad input the user can fix (a path, a file, a config, a mismatched checkpoint)."""


class CheckpointError(UserError):
    """A weights file is unreadable, incomplete or of another architecture."""


class ConfigError(UserError):
    """A config file or override names an unknown key or an unsupported value."""


class DoesNotFit(UserError):
    """The compiler refused a program over the accelerator's memory (HBM)."""


def hbm_refusal(error: BaseException) -> str | None:
    """The compiler's first line when `error` is XLA refusing a program over the accelerator's memory
    (RESOURCE_EXHAUSTED naming HBM: "Ran out of memory in memory space hbm. Used 21.9G of 15.5G hbm." or "Ran out
    of memory on HBM, ..."); None for any other error, a Pallas kernel over its VMEM included (read from the first
    line alone: the allocation listing below it may name either memory)."""
    message = str(error)
    if "RESOURCE_EXHAUSTED:" not in message:
        return None
    first = message.split("RESOURCE_EXHAUSTED:", 1)[1].strip().splitlines()[0]
    return first if "hbm" in first.lower() else None
