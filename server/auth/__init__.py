"""Who is calling: admin and agent tokens, console sessions, sign-in links."""
