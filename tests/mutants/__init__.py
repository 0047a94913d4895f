"""Mutation testing of the suite (issue 32): planted bugs and the tool that runs them."""
