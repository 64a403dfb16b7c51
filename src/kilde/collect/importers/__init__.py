"""Importers: company records, social logins and bought data, into the one pipeline.

`kilde import KIND FILE --source NAME` reads CSV, JSON Lines, Parquet or Excel files as a
stream (readers), maps columns to Kilde fields (mapping), turns rows into Segment messages (one
module per kind: transactions, contacts, interactions, broker, social_login) and sends them in
chunks (engine) to the server, which hands them to `Pipeline.ingest` (runs, api).
"""
