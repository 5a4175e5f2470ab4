//! wechat
