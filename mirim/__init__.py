"""mirim's library: what the commands at the top (train.py, sample.py, eval.py, ...) and the data commands
(data/*.py) share, one job per file. A command imports from here and model.py, never another command; this
package never imports a command. The README's file table says what each file does."""
