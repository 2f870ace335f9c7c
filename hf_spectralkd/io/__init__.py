"""Models in and out: loading teachers and students, checking saved folders, the run summary, cards and the Hub."""
