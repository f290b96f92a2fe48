"""The one exception type for mistakes a user can make; the CLI prints it without a traceback."""


class LLMTrainError(Exception):
    """Bad input or a run that cannot go on, explained in a message written for the user."""


class RunInterrupted(Exception):
    """SIGTERM/SIGINT arrived mid-run: a checkpoint was saved and the run can be resumed."""

    def __init__(self, run_name: str, run_path: str, step: int, signum: int):
        import signal

        super().__init__(
            f"Stopped by {signal.Signals(signum).name} at step {step}; checkpoint saved in {run_path}. "
            f"Resume with the same command plus --run_name {run_name}."
        )
        self.run_name, self.step, self.signum = run_name, step, signum


def refuse_without_remote_code(spec: str, error: Exception) -> None:
    """Raise the one fix when loading `spec` failed because the model is defined by its repository's own code,
    which transformers runs only with trust_remote_code."""
    if "trust_remote_code" in str(error):
        raise LLMTrainError(
            f"The model '{spec}' runs code from its own repository (its architecture is not built into "
            "transformers): pass `--trust_remote_code true` if you trust that repository (read its .py files first)."
        ) from None
