"""Family x method matrix, tiny-gemma3: every method through every command (tests/matrix/matrix_support.py);
one file per preset so that the test workers share the matrix."""

from .matrix_support import family_tests

test_pair, test_pairs_listed = family_tests("tiny-gemma3")
