"""Readers and writers of the files that cross boundaries (docs/formats.md): one each."""
