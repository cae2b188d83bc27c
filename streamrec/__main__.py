"""``python -m streamrec`` — same as the ``streamrec`` console command."""

from streamrec.cli import app

app()
