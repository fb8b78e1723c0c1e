//! defectforge library
