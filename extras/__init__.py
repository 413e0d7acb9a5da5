"""Features of the course's tool that a sub-command imports when it runs; the lessons never need to be read with them."""
