from cascadec.cli import entry

entry()
