"""`optimum-cli lrs ...`: optimum loads every module of the `optimum.commands.register` namespace package.

Kept lightweight (optimum imports it on every optimum-cli start): the command is built from
`optimum_lrs.integrations.cli`, which imports torch and transformers only when a command runs.
"""

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo


class LRSCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="lrs", help="low-rank + sparse compression (optimum-lrs): compress, eval, report")

    @staticmethod
    def parse_args(parser) -> None:
        from optimum_lrs.integrations.cli import add_arguments

        add_arguments(parser)

    def run(self) -> None:
        from optimum_lrs.integrations.cli import run

        status = run(self.args)
        if status:
            raise SystemExit(status)


REGISTER_COMMANDS = [LRSCommand]
