"""The engine behind the commands: settings and the training loop, one inference path (eval,
predict, bench, train's evaluation, export), the demo. `ddetr_cli/commands/` holds only the Typer
faces; data flows cli -> commands -> engine -> model -> ops/data, nothing back."""
