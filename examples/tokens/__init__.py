"""A user-defined embedding-bag classifier over int32 token ids, fed a stream whose vocabulary drifts."""
