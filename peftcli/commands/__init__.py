"""One module per command: each turns its arguments into calls of the stages below it (recipe,
model, methods, data, training, runs) and reports. Nothing imports a command."""
