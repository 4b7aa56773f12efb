//! (session side: being written)
