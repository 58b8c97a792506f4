//! hai-agent (in progress).
